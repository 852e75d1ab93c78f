"""`crossflow data convert` / `crossflow data features` through the real CLI entry point, with a
tiny random-weight AutoencoderKL saved locally (no download)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.features import ImageLatentEncoder, load_text_encoder
from data_pipeline.metadata import FeatureMetadata, LatentSpec, TextSpec, read_feature_metadata
from data_pipeline.readers import BadDataError, build_shard_loader, read_records
from tests.support.tiny_models import save_tiny_vae
from cluster.cli import main


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"), scaling_factor=0.5)


def test_convert_then_features(tmp_path, tiny_vae, capsys):
    raw, feat = str(tmp_path / "raw"), str(tmp_path / "feat")
    assert main(["data", "convert", "--source", "shapes", "--num-samples", "24", "--format", "mds", "--out", raw,
                 "--resolution", "64", "--shard-size", "8KB", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 24 samples in" in out and "skipped 0 samples" in out
    assert read_feature_metadata(raw) == FeatureMetadata()  # pixels only: no feature metadata
    assert main(["data", "features", "--in", raw, "--out", feat, "--format", "wds", "--vae", tiny_vae,
                 "--text-encoder", "hashed-words-8", "--max-tokens", "6", "--batch-size", "10", "--no-progress"]) == 0
    before, after = list(read_records(raw)), list(read_records(feat))
    assert [r["image"] for r in after] == [r["image"] for r in before]  # pixels kept
    lat = np.stack([r["latent"] for r in after])
    assert lat.dtype == np.float16 and lat.shape == (24, 4, 8, 8)
    meta = read_feature_metadata(feat)  # how they were made, measured over the stored latents
    assert meta.latent == LatentSpec(str(Path(tiny_vae).resolve()), 0.5, 0.0, 64, (4, 8, 8),
                                     std=pytest.approx(float(lat.astype(np.float64).std()), rel=1e-4),
                                     mean=pytest.approx(float(lat.astype(np.float64).mean()), abs=1e-4))
    assert meta.text == TextSpec("hashed-words-8", 6, 8, -1, 1.0)
    assert f"stored latents: std {meta.latent.std:.4f}" in capsys.readouterr().out
    assert after[0]["text_emb"].dtype == np.float16 and after[0]["text_emb"].shape == (6, 8)
    assert after[0]["text_mask"].dtype == bool
    # the stored latent is the autoencoder's scaled posterior mean, in 16 bits
    enc = ImageLatentEncoder(tiny_vae, "cpu")
    pixels = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")) for r in before[:3]])
    np.testing.assert_allclose(lat[:3].astype(np.float32), enc.encode(pixels).astype(np.float32), atol=2e-3)
    b = next(iter(build_shard_loader(feat, "auto", 8, shuffle=False)))
    assert set(b) == {"latent", "text_emb", "text_mask", "caption"} and b["latent"].shape == (8, 4, 8, 8)


def test_convert_with_features_measures_the_latent_scale(tmp_path, tiny_vae, capsys):
    """`data convert --vae --scaling-factor auto`: a first pass sets the factor that makes the std 1."""
    out = tmp_path / "conv"
    assert main(["data", "convert", "--source", "shapes", "--num-samples", "12", "--resolution", "64",
                 "--format", "mds", "--out", str(out), "--vae", tiny_vae, "--scaling-factor", "auto",
                 "--scale-samples", "12", "--text-encoder", "hashed-words-8", "--text-multiplier", "10",
                 "--max-tokens", "5", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    meta = read_feature_metadata(str(out))
    assert meta.latent.std == pytest.approx(1.0, abs=2e-3) and meta.latent.scaling_factor != 0.5
    assert f"scaling factor {meta.latent.scaling_factor:.5f}" in printed
    assert meta.text.multiplier == 10.0
    rec = next(read_records(str(out)))
    plain = load_text_encoder("hashed-words-8").encode([rec["caption"]], 5)[0][0]
    np.testing.assert_allclose(rec["text_emb"].astype(np.float32), 10 * plain.astype(np.float32), rtol=1e-3)


def test_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        ImageLatentEncoder(tmp_path / "no-vae")


def test_convert_folder_reports_skips(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    (src / "ok.png").write_bytes(buf.getvalue())
    (src / "ok.txt").write_text("black")
    (src / "bad.png").write_bytes(b"nope")
    (src / "bad.txt").write_text("broken")
    (src / "nocap.png").write_bytes(buf.getvalue())
    assert main(["data", "convert", "--source", "folder", "--input", str(src), "--format", "wds",
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "wrote 1 samples" in out and "skipped 2 samples" in out
    assert "corrupt image" in out and "no caption" in out
    assert json.loads((tmp_path / "o" / "shardindex.json").read_text())["shardlist"][0]["nsamples"] == 1
    with pytest.raises(ValueError, match="bad sample"):
        main(["data", "convert", "--source", "folder", "--input", str(src), "--format", "wds",
              "--out", str(tmp_path / "o2"), "--on-error", "raise", "--no-progress"])


def test_help_texts(capsys):
    for cmd in (["data", "--help"], ["data", "convert", "--help"], ["data", "features", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(cmd)
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--shard-size" in out and "--vae" in out and "s3://" in out


def test_features_missing_models_fail_before_any_work(tmp_path, shapes_shards):
    raw = shapes_shards("wds", n=4)
    for flags, message in ((["--vae", str(tmp_path / "no-vae")], "image autoencoder not found at .*no-vae"),
                           (["--text-encoder", str(tmp_path / "no-clip")], r"text encoder not found at .*no-clip")):
        with pytest.raises(FileNotFoundError, match=message):
            main(["data", "features", "--in", raw, "--out", str(tmp_path / "out"), "--num-procs", "2", *flags])
        assert not (tmp_path / "out").exists()


def test_features_names_a_bad_input_sample(tmp_path, shapes_shards):
    """A WebDataset sample without a caption stops `data features` with its shard and key."""
    import tarfile
    raw = shapes_shards("wds", n=4)
    shard = Path(raw) / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if not m.name.startswith("000000001.txt")]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    index = json.loads((Path(raw) / "shardindex.json").read_text())
    index["shardlist"][0]["filesize"] = shard.stat().st_size
    (Path(raw) / "shardindex.json").write_text(json.dumps(index))
    with pytest.raises(BadDataError, match=r"shard-000000.tar sample 1 \(key '000000001'\): no caption"):
        main(["data", "features", "--in", raw, "--out", str(tmp_path / "out"), "--text-encoder", "hashed-words-8",
              "--no-progress"])
