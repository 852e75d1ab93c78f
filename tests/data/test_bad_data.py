"""Bad data: a clear error naming the shard and sample, or skip-and-count with on_error=skip.
Never a hang (each test has a timeout) and never a silently shorter epoch."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.readers import BadDataError, build_shard_loader
from tests.data.conftest import shapes_records
from tests.support.tiny_models import tiny_text_encoder

pytestmark = pytest.mark.timeout(120)
N = 30


def _read_all(path, fmt, on_error, workers=0):
    loader = build_shard_loader(path, fmt, 4, shuffle=False, drop_last=False, on_error=on_error,
                                num_workers=workers, text_encoder=tiny_text_encoder())
    captions = [c for b in loader for c in b["caption"]]
    return captions, loader.skipped


def _shards(path: str, fmt: str) -> list[tuple[Path, int]]:
    if fmt == "mds":
        index = json.loads(Path(path, "index.json").read_text())
        return [(Path(path, s["raw_data"]["basename"]), s["samples"]) for s in index["shards"]]
    index = json.loads(Path(path, "shardindex.json").read_text())
    return [(Path(path, s["url"]), s["nsamples"]) for s in index["shardlist"]]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_corrupt_image(shapes_shards, fmt):
    records = shapes_records(N)
    records[7]["image"] = b"\x89PNG\r\n\x1a\n truncated garbage"
    path = shapes_shards(fmt, records=records)
    with pytest.raises(BadDataError) as e:
        _read_all(path, fmt, "raise")
    msg = str(e.value)
    assert "shard" in msg and "corrupt image" in msg and "000000007" in msg  # names shard, sample key
    captions, skipped = _read_all(path, fmt, "skip")
    assert len(captions) == N - 1 and skipped["skipped"] == 1
    assert "000000007" in skipped["examples"][0]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_caption_not_text(shapes_shards, fmt):
    records = shapes_records(N)
    records[4]["caption"] = "MARKER-CAPTION-XYZ"
    path = shapes_shards(fmt, records=records)
    for shard, _ in _shards(path, fmt):  # same length, not UTF-8: the bytes on disk are not text
        data = shard.read_bytes()
        if b"MARKER-CAPTION-XYZ" in data:
            shard.write_bytes(data.replace(b"MARKER-CAPTION-XYZ", b"\xff" * 18))
    with pytest.raises(BadDataError, match="caption is not text"):
        _read_all(path, fmt, "raise")
    captions, skipped = _read_all(path, fmt, "skip")
    assert len(captions) == N - 1 and skipped["skipped"] == 1


@pytest.mark.parametrize("fmt,workers", [("mds", 0), ("mds", 2), ("wds", 0), ("wds", 2)])
def test_missing_shard(shapes_shards, fmt, workers):
    path = shapes_shards(fmt, n=N, shard_bytes=3000)
    shards = _shards(path, fmt)
    assert len(shards) >= 3
    gone, lost = shards[1]
    gone.unlink()
    with pytest.raises(BadDataError, match=gone.name):
        _read_all(path, fmt, "raise", workers)
    captions, skipped = _read_all(path, fmt, "skip", workers)
    assert skipped["skipped"] == lost and len(captions) == N - lost  # counted, not silently short
    assert gone.name in skipped["examples"][0]


def test_mds_workers_waiting_on_a_failed_download_go_on_and_fail(shapes_shards):
    """Two workers (or ranks) need shard 1: one downloads it, the other's ready thread waits on that
    download through streaming's shared shard state, and the download fails (the shard is gone).
    The waiting worker must go on and fail naming the shard, not wait forever: from S3 with 2
    DataLoader workers, 3 epochs in 10 stalled until the DataLoader timeout. Here the two workers
    are two threads of one dataset, and the real download is held until the other one waits on it."""
    from streaming.base.dataset import _Iterator, _ShardState
    path = shapes_shards("mds", n=N, shard_bytes=3000)
    gone, _ = _shards(path, "mds")[1]
    gone.unlink()
    loader = build_shard_loader(path, "mds", 4, shuffle=False)
    ds, release, failed = loader.dataset, threading.Event(), []
    download = ds.streams[0].prepare_shard
    ds.streams[0].prepare_shard = lambda shard: (release.wait(10), download(shard))[1]
    ds._event = threading.Event()  # what streaming's __iter__ gives its threads

    def download_shard_1():
        try:
            ds.prepare_shard(1)
        except BadDataError as e:
            failed.append(str(e))

    downloader = threading.Thread(target=download_shard_1)
    downloader.start()
    while ds._shard_states[1] != _ShardState.PREPARING:
        time.sleep(0.01)
    samples = [i for i in range(ds.num_samples) if int(ds.spanner[i][0]) == 1]
    waiter = threading.Thread(target=ds._ready_thread, args=(_Iterator(np.array(samples)),))
    waiter.start()
    time.sleep(0.5)  # the waiter is in its wait for shard 1 to be LOCAL
    release.set()
    downloader.join(10)
    waiter.join(5)
    stuck = waiter.is_alive()
    ds._event.set()  # frees a stuck waiter before the asserts
    waiter.join(5)
    try:
        assert failed and gone.name in failed[0]
        assert not stuck, "the ready thread still waits on the failed download of shard 1"
        with pytest.raises(BadDataError, match=gone.name):  # the waiter reads it: fails too, at once
            ds.get_item(samples[0])
    finally:
        loader.close()


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_truncated_shard(shapes_shards, fmt):
    path = shapes_shards(fmt, n=N, shard_bytes=3000)
    shard, lost = _shards(path, fmt)[2]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(BadDataError, match=f"{shard.name}.*truncated"):
        _read_all(path, fmt, "raise")
    captions, skipped = _read_all(path, fmt, "skip")
    assert skipped["skipped"] == lost and len(captions) == N - lost


def test_missing_dataset_and_bad_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        build_shard_loader(str(tmp_path / "nope"), "mds", 4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_shard_loader(str(tmp_path / "empty"), "auto", 4)
    with pytest.raises(ValueError, match="on_error"):
        build_shard_loader(str(tmp_path / "empty"), "mds", 4, on_error="ignore")


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_shards_with_another_token_count_are_refused_by_name(shapes_shards, tmp_path, fmt):
    """Shards featurized with 20 tokens per caption against data.max_tokens=12: the trainer says
    which key to set instead of failing on a shape inside the Text VE."""
    from data_pipeline.convert import Featurizer
    from data_pipeline.features import load_text_encoder, text_encoder_from_config
    from tests.conftest import tiny_overrides
    from trainer.config import load_config
    from trainer.loop import build_dataloader, describe_data
    from trainer.model_input import resolve_model_input

    records = Featurizer(load_text_encoder(tiny_text_encoder()), max_tokens=20)(shapes_records(8))
    path = shapes_shards(fmt, records=records)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"data.source": fmt, "data.path": path}))
    with pytest.raises(ValueError, match=r"20 text tokens per caption but data.max_tokens=12: "
                                         r"set data.max_tokens=20"):
        encoder = text_encoder_from_config(cfg.data)
        data = describe_data(cfg)
        build_dataloader(cfg, encoder, 4, 0, 1)
        resolve_model_input(cfg, data.shards, data.metadata, encoder.dim)


def test_shards_made_with_other_text_settings_are_refused_by_name(tmp_path):
    """`data convert --text-multiplier 10` records it in crossflow_features.json; training with
    data.text_multiplier=1 would embed sample-time prompts differently: refused, naming both values."""
    from data_pipeline.features import text_encoder_from_config
    from tests.conftest import tiny_overrides
    from cluster.cli import main
    from trainer.config import load_config
    from trainer.loop import build_dataloader

    path = str(tmp_path / "shards")
    assert main(["data", "convert", "--source", "shapes", "--num-samples", "8", "--format", "wds", "--out", path,
                 "--text-encoder", tiny_text_encoder(), "--max-tokens", "12", "--text-multiplier", "10",
                 "--no-progress"]) == 0
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{"data.source": "wds", "data.path": path}))
    with pytest.raises(ValueError, match=r"text_multiplier=10.0 \(crossflow_features.json\) but "
                                         r"data.text_multiplier=1.0: set data.text_multiplier=10.0"):
        build_dataloader(cfg, text_encoder_from_config(cfg.data), 4, 0, 1)
