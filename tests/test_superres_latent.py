"""Super-resolution through the VAE on image shards (the paper's 64 -> 256 px setting in miniature):
64 px shapes images written as shards without latents, a tiny random-weight AutoencoderKL (4x8x8
latents), 16 px source; ``train()`` in this process with its validation loss and PSNR/SSIM vs bicubic
on held-out shards, its checkpoint scored by ``crossflow eval superres --images DIR --vae``; shards of
precomputed latents are refused before workers start."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from cluster.cli import main
from tests.conftest import SHAPES_TINY
from tests.support.tiny_models import save_tiny_vae, tiny_text_encoder


def test_superres_in_latent_space_on_image_shards_trains_evaluates_and_refuses_latent_shards(
        tmp_path, tiny_config, capsys):
    from trainer.loop import train
    from trainer.model_input import saved_model_input
    vae = save_tiny_vae(tmp_path / "vae")
    raw, feat = str(tmp_path / "raw"), str(tmp_path / "feat")
    val = str(tmp_path / "val")
    for out, split, n in ((raw, "train", "16"), (val, "heldout", "4")):
        assert main(["data", "convert", "--source", "shapes", "--num-samples", n, "--resolution", "64",
                     "--split", split, "--format", "wds", "--out", out, "--no-progress"]) == 0
    sr = {"data.source": "wds", "data.path": raw, "data.resolution": 64, "data.space": "latent", "data.vae": vae,
          "task.source": "upsample", "task.source_resolution": 16, "train.steps": 2, "train.ckpt_every": 2,
          "model.depth": 1, "eval.shapes": False}
    summary = train(tiny_config(**sr, **{"data.val_path": val, "eval.val_every": 2, "eval.val_samples": 4,
                                         "eval.val_t_points": 2}))
    saved = saved_model_input(summary["checkpoint"])
    assert (saved.task, saved.space, tuple(saved.latent_shape)) == ("super_resolution", "latent", (4, 8, 8))
    with Image.open(summary["samples"]) as grid:
        assert grid.mode == "RGB"
    assert np.isfinite(summary["val/loss"]) and "val/kl" not in summary  # an upsampled image has no posterior
    assert summary["task/baseline_psnr"] > 0 and {"task/psnr", "task/ssim", "task/baseline_ssim"} <= set(summary)
    assert "4 images from data.val_path=" in (tmp_path / "run" / "eval" / "task_step_00000002.txt").read_text()

    images = tmp_path / "photos"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "sr.json"
    capsys.readouterr()
    assert main(["eval", "superres", "--checkpoint", summary["checkpoint"], "--images", str(images), "--vae", vae,
                 "--steps", "2", "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert scores["num"] == 2 and set(scores["model"]) == {"psnr", "ssim"} == set(scores["baseline"])

    assert main(["data", "features", "--in", raw, "--out", feat, "--vae", vae, "--text-encoder",
                 tiny_text_encoder(), "--max-tokens", "12", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", SHAPES_TINY, "--nproc", "2",
                 *[f"{k}={v}" for k, v in {**sr, "data.path": feat}.items()],
                 "model.preset=tiny", f"data.text_encoder={tiny_text_encoder()}", "data.max_tokens=12",
                 f"train.out_dir={tmp_path / 'refused'}"]) == 2
    err = capsys.readouterr().err
    assert f"shards at {feat} hold (4, 8, 8) precomputed latents" in err and "needs the images' pixels" in err
