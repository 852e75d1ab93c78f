"""train.init_from: a new run at a larger resolution starts from a smaller run's weights (the paper's
512 px stage from its 256 px checkpoint), in miniature: 32 px -> 64 px, learned position embeddings."""
from __future__ import annotations

import pytest
import torch

from trainer.checkpoint import load_weights, resolve_weights
from trainer.loop import build_model, train
from trainer.warm_start import init_from_checkpoint, resize_latent_rows, resize_pos_embed


def test_larger_run_starts_from_smaller_checkpoint(tiny_config, tmp_path, capsys):
    common = {"model.pos_embed": "learned", "train.steps": 2, "eval.shapes": False, "sample.num_prompts": 1}
    small = tiny_config(**common, **{"train.out_dir": str(tmp_path / "px32")})
    train(small)
    old, _, _ = load_weights(resolve_weights(small.train.out_dir))

    large = tiny_config(**common, **{"data.resolution": 64, "train.out_dir": str(tmp_path / "px64"),
                                     "train.init_from": small.train.out_dir})
    model = build_model(large, (3, 64, 64), 32, torch.device("cpu"))
    resized = init_from_checkpoint(model, large.train.init_from)
    assert sorted(resized) == ["flow.pos_embed", "image_encoder.head.2.bias", "image_encoder.head.2.weight",
                               "text_ve.head.bias", "text_ve.head.weight"]
    new = model.state_dict()
    for name, tensor in old.items():  # everything else is copied as is
        if name not in resized:
            assert torch.equal(new[name], tensor), name
    assert new["flow.pos_embed"].shape == (1, 16 * 16, 128)  # 64 px / patch 4
    assert torch.allclose(new["flow.pos_embed"], resize_pos_embed(old["flow.pos_embed"], 256))
    assert new["text_ve.head.weight"].shape == (2 * 3 * 64 * 64, old["text_ve.head.weight"].shape[1])

    train(large)  # through the loop's start path
    assert "initialized from" in capsys.readouterr().out

    bad = tiny_config(**common, **{"model.hidden_size": 64, "train.out_dir": str(tmp_path / "bad"),
                                   "train.init_from": small.train.out_dir})
    with pytest.raises(ValueError, match=r"flow\..* is \(.*\) in the checkpoint .* in this model"):
        init_from_checkpoint(build_model(bad, (3, 32, 32), 32, torch.device("cpu")), small.train.out_dir)
    other = tiny_config(**{"model.family": "cross_attention_fm", "model.pos_embed": "learned"})
    with pytest.raises(ValueError, match="'crossflow' model but model.family='cross_attention_fm'"):
        init_from_checkpoint(build_model(other, (3, 32, 32), 32, torch.device("cpu")), small.train.out_dir)


def test_latent_rows_resize_each_map_bilinearly():
    """A head's rows are k latent maps: the resized rows are the bilinear upsampling of each map."""
    w = torch.randn(2 * 4 * 2 * 2, 5)  # k=2 maps of 4x2x2, 5 inputs
    out = resize_latent_rows(w, (4, 2, 2), (4, 4, 4))
    assert out.shape == (2 * 4 * 4 * 4, 5)
    maps = w.view(2, 4, 2, 2, 5)[:, :, :, :, 3]  # input 3's maps
    want = torch.nn.functional.interpolate(maps, size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.allclose(out.view(2, 4, 4, 4, 5)[..., 3], want, atol=1e-6)
