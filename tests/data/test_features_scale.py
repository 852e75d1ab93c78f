"""`crossflow data features` at dataset scale, through the real CLI: worker processes, a run
SIGKILLed mid-way and resumed to exactly the shards of an uninterrupted run, metadata beside the
shards (local and s3://), the measured latent scale."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.metadata import read_feature_metadata
from data_pipeline.readers import build_shard_loader, read_records
from tests.data.conftest import shapes_records, write_records
from tests.support.kill_run import run_and_kill
from tests.support.tiny_models import save_tiny_clip, save_tiny_vae
from cluster.cli import main

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"vae": save_tiny_vae(root / "vae", scaling_factor=0.18215), "clip": save_tiny_clip(root / "clip")}


def _features(inp, out, models, *extra):
    return ["data", "features", "--in", str(inp), "--out", str(out), "--vae", models["vae"],
            "--text-encoder", models["clip"], "--max-tokens", "8", "--text-hidden-layer", "-2",
            "--batch-size", "2", "--no-progress", *extra]


def _stored(path):
    return [(r["key"], r["caption"], r["latent"].tobytes(), r["text_emb"].tobytes(), r["text_mask"].tobytes())
            for r in read_records(str(path))]


def test_killed_run_resumes_to_the_same_shards(tmp_path, models, capsys):
    raw = write_records("mds", str(tmp_path / "raw"), shapes_records(48, resolution=64), shard_bytes=2_000)
    n_in = len(json.loads((tmp_path / "raw" / "index.json").read_text())["shards"])
    assert n_in >= 8
    ref, out = tmp_path / "ref", tmp_path / "out"
    # Same command three times (2 worker processes: bit-identical results need the same thread count per
    # process, see data_pipeline.feature_jobs): uninterrupted; SIGKILLed after 3 shards; run again.
    command = lambda dest: _features(raw, dest, models, "--scaling-factor", "auto", "--scale-samples", "16",  # noqa: E731
                                     "--num-procs", "2")
    assert main(command(ref)) == 0
    reference = capsys.readouterr().out
    done = run_and_kill(command(out), out / "_features_progress" / "done", after=3)
    assert 3 <= done < n_in and not (out / "index.json").exists()  # killed mid-way, no merged index
    assert main(command(out)) == 0
    resumed = capsys.readouterr().out
    assert f"{done} already done by an earlier run" in resumed or f"{done + 1} already" in resumed

    assert _stored(out) == _stored(ref) and len(_stored(ref)) == 48  # nothing lost, duplicated or changed
    assert [r["key"] for r in read_records(str(out))] == [r["key"] for r in read_records(raw)]  # input order
    meta, ref_meta = read_feature_metadata(str(out)), read_feature_metadata(str(ref))
    assert meta == ref_meta
    assert meta.latent.latent_shape == (4, 8, 8) and meta.latent.resolution == 64
    assert abs(meta.latent.std - 1.0) < 0.05  # auto scale measured on the first 16 images
    assert meta.text.hidden_layer == -2 and meta.text.max_tokens == 8 and meta.text.dim == 32
    assert "stored latents: std" in reference and "samples/s" in reference
    b = next(iter(build_shard_loader(str(out), "auto", 8, shuffle=True)))  # the merged index trains
    assert b["latent"].shape == (8, 4, 8, 8) and b["text_emb"].shape == (8, 8, 32)

    with pytest.raises(ValueError, match=r"made with text_hidden_layer=-2; this command gives text_hidden_layer=-1"):
        main(command(out) + ["--text-hidden-layer", "-1"])


def test_s3_in_and_out(bucket, tmp_path, models, capsys):
    """zstd MDS shards on s3:// -> features -> MDS on s3://: per-shard reads of compressed remote
    shards, the parts' indexes merged on the server, crossflow_features.json beside them; the
    same samples as from a local copy."""
    from data_pipeline.writers import open_writer
    records = shapes_records(12, resolution=64)
    for root in (f"{bucket}/raw", str(tmp_path / "raw")):
        w = open_writer("mds", root, 2_000, "zstd")
        for r in records:
            w.write(dict(r))
        w.close()
    assert main(_features(f"{bucket}/raw", f"{bucket}/feat", models)) == 0
    assert main(_features(tmp_path / "raw", tmp_path / "feat", models)) == 0
    assert "wrote 12 samples" in capsys.readouterr().out
    assert _stored(f"{bucket}/feat") == _stored(tmp_path / "feat")
    meta = read_feature_metadata(f"{bucket}/feat")
    assert meta == read_feature_metadata(str(tmp_path / "feat"))
    assert meta.latent.scaling_factor == 0.18215 and meta.latent.autoencoder == models["vae"]


def test_torchrun_ranks_split_the_shards(tmp_path, models):
    """`torchrun --nproc-per-node 2 -m cluster.cli data features ...`: ranks from RANK/WORLD_SIZE, each
    its own input shards, rank 0 merges; the same samples as one process (torchrun gives each rank
    one thread, so latents may differ in the last 16-bit place)."""
    raw = write_records("wds", str(tmp_path / "raw"), shapes_records(12, resolution=64), shard_bytes=2_000)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "cluster.cli",
                           *_features(raw, tmp_path / "ranks", models)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 merges the index" in proc.stdout and "wrote 12 samples" in proc.stdout
    assert main(_features(raw, tmp_path / "one", models)) == 0
    ranks, one = list(read_records(str(tmp_path / "ranks"))), list(read_records(str(tmp_path / "one")))
    assert [(r["key"], r["caption"]) for r in ranks] == [(r["key"], r["caption"]) for r in one]
    for a, b in zip(ranks, one):
        np.testing.assert_allclose(a["latent"].astype(np.float32), b["latent"].astype(np.float32), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(a["text_emb"].astype(np.float32), b["text_emb"].astype(np.float32), rtol=2e-3,
                                   atol=1e-3)
    done = json.loads((tmp_path / "ranks" / "_features_progress" / "done" / "part-00001.json").read_text())
    assert done["samples"] > 0
