"""The paper's setting in miniature, as a user runs it: shapes -> `data convert` (MDS) -> `data features`
(a tiny random CLIP for text, a tiny SD-shaped AutoencoderKL for latents) -> `crossflow train` with 2 Ray
workers on the latent shards -> every image the project writes is a decoded RGB image: the final grid,
`sample`, `interpolate`, `arithmetic`, `eval clip` (autoencoder found from the checkpoint, and once with
--vae), `export` and sampling from the export."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from data_pipeline.metadata import read_feature_metadata
from tests.cluster.conftest import cli, ray_tiny_overrides, run
from tests.support.tiny_models import save_tiny_clip, save_tiny_t5, save_tiny_vae
from trainer.checkpoint import latest_checkpoint, load_features
from trainer.inference import labeled_grid_size
from cluster.cli import main

pytestmark = pytest.mark.slow

RES, PAD = 64, 2  # image side; image_grid's border


def grid_size(rows: int, cols: int, side: int = RES, scale: int = 1) -> tuple[int, int]:
    """(width, height) of an image_grid PNG."""
    return ((cols * (side + PAD) + PAD) * scale, (rows * (side + PAD) + PAD) * scale)


def assert_rgb(path, size) -> None:
    with Image.open(path) as im:
        assert (im.mode, im.size) == ("RGB", size), (path, im.mode, im.size)


def test_latent_shards_train_on_ray_and_every_image_is_decoded(tmp_path, capsys):
    vae = save_tiny_vae(tmp_path / "vae")  # 4 latent channels, 8x downsampling: 64 px -> (4, 8, 8)
    clip = save_tiny_clip(tmp_path / "clip")
    raw, feat, out = tmp_path / "raw", tmp_path / "feat", tmp_path / "run"
    assert main(["data", "convert", "--source", "shapes", "--num-samples", "32", "--resolution", str(RES),
                 "--format", "mds", "--out", str(raw), "--no-progress"]) == 0
    assert main(["data", "features", "--in", str(raw), "--out", str(feat), "--vae", vae, "--text-encoder", clip,
                 "--max-tokens", "8", "--no-progress"]) == 0
    meta = read_feature_metadata(str(feat))
    assert meta.latent.latent_shape == (4, 8, 8) and meta.latent.autoencoder == vae

    train = run(cli("train", "--config", "configs/shapes_tiny.yaml", *ray_tiny_overrides(
        out, **{"data.source": "mds", "data.path": str(feat), "data.text_encoder": clip, "data.max_tokens": 8,
                "data.resolution": RES, "train.steps": 2, "train.log_every": 1})), timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    # 2 prompts seen in training: the prompt, the decoded stored latent, then 4 samples, upscaled 4x
    assert_rgb(out / "samples" / "final.png", labeled_grid_size(2, 5, RES, scale=4))
    config = json.loads((out / "config.json").read_text())["data"]
    assert (config["space"], config["vae"], config["text_dim"]) == ("latent", vae, 32)
    ckpt = latest_checkpoint(out)
    assert load_features(ckpt / "weights.safetensors").latent == meta.latent
    assert read_feature_metadata(str(ckpt)).latent == meta.latent

    ode = ["--checkpoint", str(out), "--steps", "2", "--scale", "1"]
    assert main(["sample", *ode, "--prompt", "a red circle", "--per-prompt", "2",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert_rgb(tmp_path / "s.png", grid_size(1, 2))
    assert main(["interpolate", "a red circle", "a blue square", "--num", "3", *ode,
                 "--out", str(tmp_path / "i.png")]) == 0
    assert_rgb(tmp_path / "i.png", grid_size(1, 3))
    assert main(["arithmetic", "a red circle", "-", "a red square", "+", "a blue square", *ode,
                 "--out", str(tmp_path / "a.png")]) == 0
    assert_rgb(tmp_path / "a.png", grid_size(1, 4))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    capsys.readouterr()
    assert main(["eval", "clip", "--checkpoint", str(out), "--clip", clip, "--prompts", str(prompts),
                 "--per-prompt", "1", "--steps", "2"]) == 0
    assert "CLIP score (2 image-prompt pairs)" in capsys.readouterr().out

    # --vae: a copy of the autoencoder in another folder decodes the same images
    copy = save_tiny_vae(tmp_path / "vae-copy")
    assert main(["sample", *ode, "--prompt", "a red circle", "--per-prompt", "2", "--vae", copy,
                 "--out", str(tmp_path / "s2.png")]) == 0
    with Image.open(tmp_path / "s.png") as a, Image.open(tmp_path / "s2.png") as b:
        assert a.tobytes() == b.tobytes()
    other = save_tiny_vae(tmp_path / "vae-other", scaling_factor=0.13025)
    with pytest.raises(ValueError, match=r"--vae=.*vae-other has scaling_factor=0.13025"):
        main(["sample", *ode, "--prompt", "a red circle", "--vae", other, "--out", str(tmp_path / "x.png")])

    export = tmp_path / "model.safetensors"
    assert main(["export", "--checkpoint", str(out), "--out", str(export)]) == 0
    assert load_features(export).latent == meta.latent
    assert main(["sample", "--checkpoint", str(export), "--steps", "2", "--scale", "1", "--prompt", "a red circle",
                 "--per-prompt", "2", "--out", str(tmp_path / "e.png")]) == 0
    with Image.open(tmp_path / "s.png") as a, Image.open(tmp_path / "e.png") as b:
        assert a.tobytes() == b.tobytes()  # the export's EMA is the checkpoint's


def test_baseline_on_t5_latents_trains_on_ray_with_checkpointing_and_compile(tmp_path):
    """The same path for the cross-attention baseline, with the T5 side of the paper's setting: a tiny
    full T5 folder's encoder (features x10, the reimplementation's multiplier, projected by a learned MLP
    before the cross-attention), 2 Ray workers, activation checkpointing and torch.compile on."""
    vae = save_tiny_vae(tmp_path / "vae")
    t5 = save_tiny_t5(tmp_path / "t5")
    raw, feat, out = tmp_path / "raw", tmp_path / "feat", tmp_path / "run"
    assert main(["data", "convert", "--source", "shapes", "--num-samples", "32", "--resolution", str(RES),
                 "--format", "mds", "--out", str(raw), "--no-progress"]) == 0
    assert main(["data", "features", "--in", str(raw), "--out", str(feat), "--vae", vae, "--text-encoder", t5,
                 "--text-multiplier", "10", "--max-tokens", "8", "--no-progress"]) == 0
    meta = read_feature_metadata(str(feat))
    assert meta.text.multiplier == 10.0 and meta.latent.latent_shape == (4, 8, 8)

    train = run(cli("train", "--config", "configs/shapes_tiny.yaml", *ray_tiny_overrides(
        out, **{"model.family": "cross_attention_fm", "model.text_proj_dim": 16,
                "train.activation_checkpointing": "true", "train.compile": "true",
                "data.source": "mds", "data.path": str(feat), "data.text_encoder": t5, "data.max_tokens": 8,
                "data.text_multiplier": 10.0, "data.resolution": RES, "train.steps": 2, "train.log_every": 1})),
        timeout=600)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert_rgb(out / "samples" / "final.png", labeled_grid_size(2, 5, RES, scale=4))
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["family"] == "cross_attention_fm" and config["data"]["space"] == "latent"
    assert main(["sample", "--checkpoint", str(out), "--steps", "2", "--scale", "1", "--prompt", "a red circle",
                 "--per-prompt", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert_rgb(tmp_path / "s.png", grid_size(1, 2))
