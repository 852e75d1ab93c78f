"""`trainer.loop.train` end to end from MDS shards on the local S3 endpoint (2 forked workers)."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import tiny_overrides
from tests.data.conftest import shapes_records, write_records

pytestmark = pytest.mark.timeout(400)


def test_train_from_s3_mds(bucket, tmp_path):
    from trainer.config import load_config
    from trainer.loop import train

    path = write_records("mds", f"{bucket}/train", shapes_records(48), shard_bytes=6000)
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, **{"data.source": "mds", "data.path": path, "data.num_workers": 2,
                                                   "train.steps": 8, "train.global_batch_size": 8}))
    summary = train(cfg)
    assert summary["steps"] == 8 and math.isfinite(summary["final_loss"])
    assert (run / "shard_cache" / "index.json").is_file()  # streamed through the local cache
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r][-1] == 8  # 48 samples / 8: crossed an epoch
