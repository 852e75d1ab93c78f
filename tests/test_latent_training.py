"""The cross-attention baseline on latent shards, in this process: it trains, its sample grid and its
checkpoint's samples decode through the autoencoder, and resuming it on other data is refused (also
from a checkpoint without its weights file, as a restarted Ray worker fetches it)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cluster.cli import main
from tests.conftest import SHAPES_TINY
from tests.support.tiny_models import save_tiny_vae, tiny_text_encoder


def test_cross_attention_baseline_on_latents_decodes_and_refuses_other_data(tmp_path, tiny_config, capsys):
    from trainer.checkpoint import latest_checkpoint, read_checkpoint_metadata, read_weights_metadata
    from trainer.inference import labeled_grid_size, load_generator
    from trainer.loop import train
    vae = save_tiny_vae(tmp_path / "vae")
    raw, feat = str(tmp_path / "raw"), str(tmp_path / "feat")
    assert main(["data", "convert", "--source", "shapes", "--num-samples", "16", "--resolution", "64",
                 "--format", "wds", "--out", raw, "--no-progress"]) == 0
    assert main(["data", "features", "--in", raw, "--out", feat, "--vae", vae, "--text-encoder", tiny_text_encoder(),
                 "--max-tokens", "12", "--no-progress"]) == 0
    data = {"data.source": "wds", "data.resolution": 64, "model.family": "cross_attention_fm", "train.steps": 2,
            "eval.shapes": False}
    cfg = tiny_config(**data, **{"data.path": feat})
    summary = train(cfg)
    with Image.open(summary["samples"]) as grid:  # 2 rows: prompt, stored latent decoded, 4 samples; 64 px, 4x
        assert (grid.mode, grid.size) == ("RGB", labeled_grid_size(2, 5, side=64, scale=4))
    gen = load_generator(cfg.train.out_dir)
    assert gen.codec.name == "latent" and gen.codec.spec.autoencoder == vae
    [image] = gen.generate(["a red circle"], steps=2)
    assert image.shape == (64, 64, 3)

    pixels = tiny_config(**{**data, "data.path": raw, "data.space": "pixels", "train.steps": 4,
                            "train.resume": "auto"})
    with pytest.raises(ValueError, match=r"trained on latents \(4, 8, 8\), 64 px, scaling_factor=0.18215.* "
                                         r"data are pixels \(3, 64, 64\)"):
        train(pixels)

    ckpt = latest_checkpoint(cfg.train.out_dir)  # its small files say what its weights' header says
    assert read_checkpoint_metadata(ckpt) == read_weights_metadata(ckpt / "weights.safetensors")
    (ckpt / "weights.safetensors").unlink()  # resuming reads only the small files
    with pytest.raises(ValueError, match=r"trained on latents \(4, 8, 8\), 64 px, scaling_factor=0.18215.* "
                                         r"data are pixels \(3, 64, 64\)"):
        train(pixels)
    capsys.readouterr()
    assert train(tiny_config(**{**data, "data.path": feat, "train.steps": 3, "train.resume": "auto"}))["steps"] == 3
    assert f"resumed from {ckpt} at step 2" in capsys.readouterr().out


def test_mismatched_latent_shards_fail_before_workers_start(tmp_path, tiny_config, capsys):
    """`crossflow train` on 2 workers: shards, config and autoencoder that disagree are refused by the
    launching process, naming both values, before Ray or torchrun starts."""
    from data_pipeline.metadata import FeatureMetadata, LatentSpec, write_feature_metadata
    from tests.data.conftest import shapes_records, write_records
    vae = save_tiny_vae(tmp_path / "vae")
    records = [{**r, "latent": np.zeros((4, 8, 8), np.float16)} for r in shapes_records(4, resolution=64)]
    shards = write_records("mds", str(tmp_path / "shards"), records)
    write_feature_metadata(shards, FeatureMetadata(LatentSpec(vae, 0.18215, 0.0, 64, (4, 8, 8))))
    base = ["train", "--config", SHAPES_TINY, "--nproc", "2", "model.preset=tiny", "data.source=mds",
            f"data.path={shards}", f"data.text_encoder={tiny_text_encoder()}", "data.max_tokens=12", f"train.out_dir={tmp_path / 'run'}"]
    assert main(base) == 2  # data.resolution is 32
    assert "data.resolution=32 but the latents in shards at" in capsys.readouterr().err
    other = save_tiny_vae(tmp_path / "other", scaling_factor=0.13025)
    assert main(base + ["data.resolution=64", f"data.vae={other}"]) == 2
    err = capsys.readouterr().err
    assert "scaling_factor=0.13025" in err and "scaling_factor=0.18215" in err
    assert main(base + ["data.resolution=64", f"data.vae={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
