"""`trainer.loop.train` end to end from MDS shards on the local S3 endpoint (2 forked workers)."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import tiny_overrides
from tests.data.conftest import shapes_records, write_records

pytestmark = pytest.mark.timeout(400)


def test_train_from_s3_mds(bucket, tmp_path, monkeypatch):
    """Trains from s3:// through a node-local cache: ``$CROSSFLOW_CACHE_DIR`` (else the temporary
    folder), one folder per (remote path, index content, run directory), none in the run directory
    (which nodes may share); an explicit ``data.cache_dir`` wins."""
    from data_pipeline.readers import default_cache_dir, shard_loader_from_config
    from data_pipeline.s3 import s3_filesystem
    from trainer.config import load_config
    from trainer.loop import train

    node = tmp_path / "node-local"
    monkeypatch.setenv("CROSSFLOW_CACHE_DIR", str(node))
    path = write_records("mds", f"{bucket}/train", shapes_records(48), shard_bytes=6000)
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, **{"data.source": "mds", "data.path": path, "data.num_workers": 2,
                                                   "train.steps": 8, "train.global_batch_size": 8}))
    summary = train(cfg)
    assert summary["steps"] == 8 and math.isfinite(summary["final_loss"])
    cache = default_cache_dir(path, "mds", str(run))
    assert [str(p) for p in node.iterdir()] == [cache]
    assert (node / cache / "index.json").is_file() and not (run / "shard_cache").exists()  # streamed through it
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r][-1] == 8  # 48 samples / 8: crossed an epoch

    assert default_cache_dir(path, "mds", str(tmp_path / "other-run")) != cache  # concurrent runs: never shared
    fs, index = s3_filesystem(), f"{path}/index.json".removeprefix("s3://")
    fs.pipe_file(index, fs.cat_file(index) + b"\n")  # the dataset rewritten in place
    assert default_cache_dir(path, "mds", str(run)) != cache  # a fresh folder, not the stale one

    explicit = tmp_path / "explicit"
    cfg = load_config(None, tiny_overrides(run, **{"data.source": "mds", "data.path": path,
                                                   "data.cache_dir": str(explicit)}))
    loader = shard_loader_from_config(cfg.data, 4, rank=0, world_size=1, seed=0, out_dir=str(run))
    assert [s.local for s in loader.dataset.streams] == [str(explicit)]
