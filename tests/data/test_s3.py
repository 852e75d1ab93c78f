"""Against a real S3 server (Ceph RGW on loopback, see conftest): round trips, streaming with
forked workers, resume, and the failures a remote adds. Skipped, with the reason, without RGW."""
from __future__ import annotations

import logging

import pytest

from data_pipeline.convert import convert
from data_pipeline.readers import BadDataError, build_shard_loader, read_records
from data_pipeline.s3 import s3_filesystem
from data_pipeline.sources import open_source
from tests.data.conftest import shapes_records, write_records
from tests.support.tiny_models import tiny_text_encoder

pytestmark = pytest.mark.timeout(240)


def _fingerprint(loader):
    return [(c, float(img.double().sum())) for b in loader for c, img in zip(b["caption"], b["image"])]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_s3_roundtrip_equal_bytes(bucket, tmp_path, fmt, caplog, capsys, s3_env):
    caplog.set_level(logging.DEBUG, logger="data_pipeline")
    items = list(open_source("shapes", num_samples=30))
    out = f"{bucket}/ds/{fmt}"
    summary = convert(items, fmt, out, shard_bytes=3000, progress=False)
    assert summary.samples == 30 and summary.shards > 1
    back = list(read_records(out, fmt, cache_dir=str(tmp_path / "cache")))
    assert [b["image"] for b in back] == [i.image for i in items]
    assert [b["caption"] for b in back] == [i.caption for i in items]
    # credentials never logged or printed
    printed = capsys.readouterr()
    for text in (caplog.text, printed.out, printed.err):
        assert s3_env.SECRET_KEY not in text and s3_env.ACCESS_KEY not in text


def test_s3_mds_streams_with_forked_workers(bucket, tmp_path):
    """Streaming from s3:// with 2 forked DataLoader workers gives every sample intact, every
    epoch (RGW exposed corrupt reads here until each stream's downloader was closed before the fork)."""
    records = shapes_records(48)
    out = write_records("mds", f"{bucket}/mds", records, shard_bytes=3000)
    local = build_shard_loader(write_records("mds", str(tmp_path / "local"), records, shard_bytes=3000), "mds", 4,
                               shuffle=True, seed=3, text_encoder=tiny_text_encoder())
    expect = sorted(_fingerprint(local))
    for attempt in range(3):
        loader = build_shard_loader(out, "mds", 4, num_workers=2, shuffle=True, seed=3, cache_dir=str(tmp_path / f"c{attempt}"),
                                    text_encoder=tiny_text_encoder())
        for epoch in range(2):
            got = _fingerprint(loader)
            assert sorted(got) == expect, f"attempt {attempt} epoch {epoch}: samples differ"


def test_s3_mds_resume_with_workers(bucket, tmp_path):
    out = write_records("mds", f"{bucket}/mds", shapes_records(40), shard_bytes=3000)
    mk = lambda tag: build_shard_loader(out, "mds", 4, num_workers=2, shuffle=True, seed=1,  # noqa: E731
                                       cache_dir=str(tmp_path / tag), text_encoder=tiny_text_encoder())
    full = [tuple(b["caption"]) for b in mk("a")]
    first = mk("b")
    it = iter(first)
    head = [tuple(next(it)["caption"]) for _ in range(4)]
    state = first.state_dict()
    del it
    resumed = mk("c")
    resumed.load_state_dict(state)
    assert head + [tuple(b["caption"]) for b in resumed] == full


@pytest.mark.parametrize("cache", [False, True])
def test_s3_wds_streams_with_workers(bucket, tmp_path, cache):
    records = shapes_records(30)
    out = write_records("wds", f"{bucket}/wds", records, shard_bytes=12000)
    loader = build_shard_loader(out, "wds", 4, num_workers=2, drop_last=False, shuffle=True,
                                cache_dir=str(tmp_path / "c") if cache else None, text_encoder=tiny_text_encoder())
    assert sorted(c for c, _ in _fingerprint(loader)) == sorted(r["caption"] for r in records)
    if cache:
        assert len(list((tmp_path / "c").glob("*.tar"))) > 1


def test_s3_missing_bucket_is_named(s3_env, tmp_path):
    for fmt in ("mds", "wds"):
        with pytest.raises(FileNotFoundError, match="no-such-bucket"):
            build_shard_loader("s3://no-such-bucket/data", fmt, 4, cache_dir=str(tmp_path))
        with pytest.raises(FileNotFoundError, match="no-such-bucket"):
            convert(open_source("shapes", num_samples=2), fmt, "s3://no-such-bucket/out", progress=False)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_s3_missing_shard(bucket, tmp_path, fmt):
    out = write_records(fmt, f"{bucket}/{fmt}", shapes_records(30), shard_bytes=3000 if fmt == "mds" else 12000)
    fs = s3_filesystem()
    shards = sorted(p for p in fs.ls(out.removeprefix("s3://")) if p.endswith((".mds", ".tar")))
    fs.rm(shards[1])
    name = shards[1].rsplit("/", 1)[-1]
    loader = build_shard_loader(out, fmt, 4, num_workers=2, shuffle=False, drop_last=False,
                                cache_dir=str(tmp_path / "c"), text_encoder=tiny_text_encoder())
    with pytest.raises(BadDataError, match=name):
        list(loader)
    skipping = build_shard_loader(out, fmt, 4, num_workers=2, shuffle=False, drop_last=False, on_error="skip",
                                  cache_dir=str(tmp_path / "d"), text_encoder=tiny_text_encoder())
    n = sum(len(b["caption"]) for b in skipping)
    assert skipping.skipped["skipped"] > 0 and n + skipping.skipped["skipped"] == 30
