"""The cross-attention baseline on latent shards, in this process: it trains, its sample grid and its
checkpoint's samples decode through the autoencoder, and resuming it on other data is refused."""
from __future__ import annotations

import pytest
from PIL import Image

from tests.support.tiny_models import save_tiny_vae
from trainer.cli import main


def test_cross_attention_baseline_on_latents_decodes_and_refuses_other_data(tmp_path, tiny_config):
    from trainer.inference import load_generator
    from trainer.loop import train
    vae = save_tiny_vae(tmp_path / "vae")
    raw, feat = str(tmp_path / "raw"), str(tmp_path / "feat")
    assert main(["data", "convert", "--source", "shapes", "--num-samples", "16", "--resolution", "64",
                 "--format", "wds", "--out", raw, "--no-progress"]) == 0
    assert main(["data", "features", "--in", raw, "--out", feat, "--vae", vae, "--text-encoder", "hashed-words-32",
                 "--max-tokens", "12", "--no-progress"]) == 0
    data = {"data.source": "wds", "data.resolution": 64, "model.family": "cross_attention_fm", "train.steps": 2,
            "eval.shapes": False}
    cfg = tiny_config(**data, **{"data.path": feat})
    summary = train(cfg)
    with Image.open(summary["samples"]) as grid:  # 2 rows: stored latent decoded + 4 samples, 64 px, 4x
        assert (grid.mode, grid.size) == ("RGB", ((5 * 66 + 2) * 4, (2 * 66 + 2) * 4))
    gen = load_generator(cfg.train.out_dir)
    assert gen.codec.name == "latent" and gen.codec.spec.autoencoder == vae
    [image] = gen.generate(["a red circle"], steps=2)
    assert image.shape == (64, 64, 3)

    pixels = tiny_config(**{**data, "data.path": raw, "data.space": "pixels", "train.steps": 4,
                            "train.resume": "auto"})
    with pytest.raises(ValueError, match=r"trained on latents \(4, 8, 8\), 64 px, scaling_factor=0.18215.* "
                                         r"data are pixels \(3, 64, 64\)"):
        train(pixels)
