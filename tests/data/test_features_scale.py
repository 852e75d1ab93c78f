"""`crossflow data features` at dataset scale, through the real CLI: worker processes, a run
SIGKILLed mid-way and resumed to exactly the shards of an uninterrupted run, torchrun ranks,
metadata beside the shards (local and s3://), the measured latent scale."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

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


def test_killed_run_resumes_to_the_same_shards_and_torchrun_agrees(tmp_path, models, capsys):
    raw = write_records("mds", str(tmp_path / "raw"), shapes_records(48, resolution=64), shard_bytes=2_000)
    n_in = len(json.loads((tmp_path / "raw" / "index.json").read_text())["shards"])
    assert n_in >= 8
    ref, out = tmp_path / "ref", tmp_path / "out"
    # The uninterrupted reference runs in this process with one torch thread: what each of the 2
    # workers below runs with (bit-identical results need the same thread count per process, see
    # data_pipeline.feature_jobs). Then the 2-worker command is SIGKILLed after 3 shards, and run again.
    command = lambda dest: _features(raw, dest, models, "--scaling-factor", "auto", "--scale-samples", "16",  # noqa: E731
                                     "--num-procs", "2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(command(ref)[:-2]) == 0
    finally:
        torch.set_num_threads(threads)
    reference = capsys.readouterr().out
    done = run_and_kill(command(out), out / "_features_progress" / "done", after=3)
    assert 3 <= done < n_in and not (out / "index.json").exists()  # killed mid-way, no merged index
    assert main(command(out)) == 0
    resumed = capsys.readouterr().out
    assert f"{done} already done by an earlier run" in resumed or f"{done + 1} already" in resumed

    assert _stored(out) == _stored(ref) and len(_stored(ref)) == 48  # nothing lost, duplicated or changed
    assert [r["key"] for r in read_records(str(out))] == [r["key"] for r in read_records(raw)]  # input order
    meta, ref_meta = read_feature_metadata(str(out)), read_feature_metadata(str(ref))
    # the scale pass ran with 2 threads in the killed run's parent: the same factor up to float rounding
    assert meta.latent.scaling_factor == pytest.approx(ref_meta.latent.scaling_factor, rel=1e-6)
    assert replace(meta.latent, scaling_factor=0) == replace(ref_meta.latent, scaling_factor=0)
    assert meta.text == ref_meta.text
    assert meta.latent.latent_shape == (4, 8, 8) and meta.latent.resolution == 64
    assert abs(meta.latent.std - 1.0) < 0.05  # auto scale measured on the first 16 images
    assert meta.text.hidden_layer == -2 and meta.text.max_tokens == 8 and meta.text.dim == 32
    assert "stored latents: std" in reference and "samples/s" in reference
    b = next(iter(build_shard_loader(str(out), "auto", 8, shuffle=True)))  # the merged index trains
    assert b["latent"].shape == (8, 4, 8, 8) and b["text_emb"].shape == (8, 8, 32)

    with pytest.raises(ValueError, match=r"made with text_hidden_layer=-2; this command gives text_hidden_layer=-1"):
        main(command(out) + ["--text-hidden-layer", "-1"])

    # torchrun: ranks from RANK/WORLD_SIZE (one thread each, as the workers above), rank 0 merges
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[2]))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "cluster.cli",
                           *command(tmp_path / "ranks")[:-2]], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 merges the index" in proc.stdout and "wrote 48 samples" in proc.stdout
    assert _stored(tmp_path / "ranks") == _stored(ref)


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

    # What a run killed while writing part 1 leaves on S3: part 1 half there, no marker, no merged index.
    from data_pipeline.s3 import s3_filesystem
    fs = s3_filesystem()
    fs.rm([f"{bucket}/feat/_features_progress/done/part-00001.json", f"{bucket}/feat/index.json",
           f"{bucket}/feat/part-00001/index.json"])
    assert main(_features(f"{bucket}/raw", f"{bucket}/feat", models)) == 0
    parts, done = map(int, re.search(r"(\d+) input shards, (\d+) already done", capsys.readouterr().out).groups())
    assert parts >= 2 and done == parts - 1  # only part 1 redone
    assert _stored(f"{bucket}/feat") == _stored(tmp_path / "feat")
