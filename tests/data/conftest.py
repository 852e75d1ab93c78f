"""Fixtures for the data-pipeline tests: small shape shards and a real S3 server (Ceph RGW).

The RGW is started once per session on 127.0.0.1 (about 20 s) and stopped, with its temporary
directory removed, at the end. Where it cannot be installed or started, every test using it is
skipped with the reason (shown by ``pytest -ra``); nothing falls back to a mock.
"""
from __future__ import annotations

import itertools
import os

import pytest

from data_pipeline.s3 import LocalRGW, rgw_unavailable_reason
from data_pipeline.sources import shapes_source
from data_pipeline.writers import open_writer


def shapes_records(n: int, resolution: int = 32, seed: int = 0) -> list[dict]:
    return [{"key": s.key, "caption": s.caption, "image": s.image, "image_ext": s.image_ext, "meta": s.meta}
            for s in shapes_source(n, resolution=resolution, seed=seed)]


def write_records(fmt: str, out: str, records: list[dict], shard_bytes: int = 8_000) -> str:
    w = open_writer(fmt, out, shard_bytes)
    for r in records:
        w.write(r)
    w.close()
    return out


@pytest.fixture
def shapes_shards(tmp_path):
    """``make(fmt, n=..., name=..., records=...)`` -> path of freshly written shards."""
    counter = itertools.count()

    def make(fmt: str, n: int = 60, records: list[dict] | None = None, shard_bytes: int = 8_000) -> str:
        out = str(tmp_path / f"{fmt}-{next(counter)}")
        return write_records(fmt, out, records if records is not None else shapes_records(n), shard_bytes)
    return make


_rgw_state: dict = {}


@pytest.fixture(scope="session")
def rgw():
    reason = rgw_unavailable_reason()
    if reason:
        print(f"\nS3 tests skipped: {reason}")
        pytest.skip(reason)
    server = LocalRGW()
    try:
        server.start()
    except Exception as e:  # noqa: BLE001 - any start failure means "no S3 here", reported
        reason = f"Ceph RGW could not start: {e}"
        print(f"\nS3 tests skipped: {reason}")
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(rgw, monkeypatch):
    """The RGW's endpoint and test credentials in the environment (both endpoint variables)."""
    for k, v in rgw.env.items():
        monkeypatch.setenv(k, v)
    return rgw


@pytest.fixture
def bucket(s3_env, request):
    """A fresh bucket per test: ``s3://cf-<n>``."""
    n = _rgw_state.setdefault("n", itertools.count())
    return s3_env.create_bucket(f"cf-test-{next(n)}-{os.getpid()}")
