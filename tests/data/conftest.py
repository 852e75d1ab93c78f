"""Fixtures for the data-pipeline tests: small shape shards (the S3 server is in tests/conftest.py)."""
from __future__ import annotations

import itertools

import pytest

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
