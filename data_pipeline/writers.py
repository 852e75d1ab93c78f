"""Shard writers: MDS (mosaicml-streaming) and WebDataset tars, to a folder or ``s3://``.

A *record* is what a shard stores per sample::

    key        str
    caption    str
    image      bytes    the encoded image file, untouched (png, jpg...)
    image_ext  str
    meta       dict     JSON metadata (shapes: the scene)
    text_emb   (n, d) float16   optional: token embeddings of the caption
    text_mask  (n,) bool        optional: True = real token
    latent     (C, h, w) float16  optional: image-autoencoder latent

Shards are cut by size (``shard_bytes``) and each format gets its index: MDS its ``index.json``;
WebDataset a ``shardindex.json`` in the ``wids`` shard-index format (``shardlist`` of url,
nsamples, filesize), which the reader uses to plan epochs and to notice a missing or truncated
shard. WebDataset member names are ``<key>.<column>``: ``.txt`` caption, ``.json`` meta,
``.<ext>`` image, ``.text_emb.npy``, ``.text_mask.npy``, ``.latent.npy``.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.s3 import check_bucket, is_remote, s3_filesystem, sync_endpoint_env

FORMATS = ("mds", "wds")
FEATURE_COLUMNS = ("text_emb", "text_mask", "latent")
WDS_INDEX = "shardindex.json"
MDS_INDEX = "index.json"
DEFAULT_SHARD_BYTES = 64 << 20


@dataclass
class WriteSummary:
    samples: int = 0
    shards: int = 0
    bytes: int = 0


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def _safe_key(key: str) -> str:
    """WebDataset splits member names at the first dot: keys may hold no dots or slashes."""
    return re.sub(r"[./\\\s]", "_", key)


class ShardWriter:
    """Writes records into size-bounded shards; ``close()`` finishes the index and returns a summary."""

    def __init__(self, out: str, shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.out = str(out).rstrip("/")
        self.shard_bytes = shard_bytes
        self.summary = WriteSummary()
        self._features: tuple[str, ...] | None = None
        if is_remote(self.out):
            if not self.out.startswith("s3://"):
                raise ValueError(f"only local folders and s3:// are supported, got {self.out}")
            sync_endpoint_env()
            check_bucket(self.out)
        else:
            p = Path(self.out)
            if p.exists() and any(p.iterdir()):
                raise FileExistsError(f"output folder {p} is not empty; give a new or empty folder")

    def _check_columns(self, record: dict) -> None:
        feats = tuple(c for c in FEATURE_COLUMNS if c in record)
        if self._features is None:
            self._features = feats
        elif feats != self._features:
            raise ValueError(f"sample {record['key']!r} has feature columns {feats}, earlier samples {self._features}: "
                             f"every sample of a dataset must carry the same columns")

    def write(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> WriteSummary:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


class MDSShardWriter(ShardWriter):
    """mosaicml-streaming's MDSWriter; columns are fixed from the first record (features with a
    static dtype and shape, so every sample's arrays are checked against the first's)."""

    def __init__(self, out: str, shard_bytes: int = DEFAULT_SHARD_BYTES, compression: str | None = None):
        super().__init__(out, shard_bytes)
        self.compression = compression
        self._writer = None

    def _columns(self, record: dict) -> dict[str, str]:
        cols = {"key": "str", "caption": "str", "image": "bytes", "image_ext": "str", "meta": "json"}
        for c in FEATURE_COLUMNS:
            if c in record:
                a = np.asarray(record[c])
                dtype = "uint8" if a.dtype == bool else str(a.dtype)
                cols[c] = f"ndarray:{dtype}:{','.join(map(str, a.shape))}"
        return cols

    def write(self, record: dict) -> None:
        self._check_columns(record)
        if self._writer is None:
            from streaming import MDSWriter
            self._writer = MDSWriter(out=self.out, columns=self._columns(record), compression=self.compression,
                                     size_limit=self.shard_bytes, progress_bar=False, exist_ok=True)
        sample = {"key": record["key"], "caption": record["caption"], "image": record["image"],
                  "image_ext": record["image_ext"], "meta": record.get("meta") or {}}
        for c in self._features:
            a = np.ascontiguousarray(record[c])
            sample[c] = a.astype(np.uint8) if a.dtype == bool else a
        self._writer.write(sample)
        self.summary.samples += 1

    def close(self) -> WriteSummary:
        if self._writer is None:
            raise ValueError(f"no sample was written to {self.out}: refusing to write an empty dataset")
        local = self._writer.local
        self._writer.finish()
        index = json.loads(Path(local, MDS_INDEX).read_text()) if Path(local, MDS_INDEX).exists() else None
        if index is None:  # remote-only output: the writer's temp dir is gone; read the uploaded index
            index = json.loads(s3_filesystem().cat(f"{self.out}/{MDS_INDEX}"))
        self.summary.shards = len(index["shards"])
        self.summary.bytes = sum((s.get("zip_data") or s["raw_data"])["bytes"] for s in index["shards"])
        return self.summary


class WDSShardWriter(ShardWriter):
    """Plain tar shards ``shard-000000.tar``... (deterministic: mtime 0, sorted members) and a
    ``shardindex.json``. For ``s3://`` each finished shard is uploaded and its local copy removed."""

    def __init__(self, out: str, shard_bytes: int = DEFAULT_SHARD_BYTES):
        super().__init__(out, shard_bytes)
        self.remote = is_remote(self.out)
        self.local = Path(tempfile.mkdtemp(prefix="crossflow-wds-")) if self.remote else Path(self.out)
        self.local.mkdir(parents=True, exist_ok=True)
        self._tar: tarfile.TarFile | None = None
        self._name = ""
        self._count = 0
        self._shards: list[dict] = []
        self._fs = s3_filesystem() if self.remote else None

    def _members(self, record: dict) -> dict[str, bytes]:
        m = {"txt": record["caption"].encode("utf-8")}
        if record["image"]:  # latent-only records carry no pixels
            m[record["image_ext"]] = record["image"]
        if record.get("meta"):
            m["json"] = json.dumps(record["meta"], sort_keys=True).encode()
        for c in self._features:
            m[f"{c}.npy"] = npy_bytes(np.asarray(record[c]))
        return m

    def write(self, record: dict) -> None:
        self._check_columns(record)
        members = sorted(self._members(record).items())
        size = sum(512 + -(-len(data) // 512) * 512 for _, data in members)  # header + padded data
        # Cut before the limit would be crossed (tar's end blocks pad a shard to a 10 KiB multiple).
        if self._tar is not None and self._count and self._tar.offset + size + 1024 > self.shard_bytes:
            self._finish_shard()
        if self._tar is None:
            self._name = f"shard-{len(self._shards):06d}.tar"
            self._tar = tarfile.open(self.local / self._name, "w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        key = _safe_key(record["key"])
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.summary.samples += 1

    def _finish_shard(self) -> None:
        self._tar.close()
        self._tar = None
        path = self.local / self._name
        size = path.stat().st_size
        self._shards.append({"url": self._name, "nsamples": self._count, "filesize": size})
        if self.remote:
            self._fs.put_file(str(path), f"{self.out}/{self._name}")
            path.unlink()

    def close(self) -> WriteSummary:
        if self._tar is not None:
            self._finish_shard()
        if not self._shards:
            raise ValueError(f"no sample was written to {self.out}: refusing to write an empty dataset")
        index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "crossflow",
                 "shardlist": self._shards, "crossflow_features": list(self._features or ())}
        text = json.dumps(index, indent=1)
        if self.remote:
            self._fs.pipe_file(f"{self.out}/{WDS_INDEX}", text.encode())
            shutil.rmtree(self.local, ignore_errors=True)
        else:
            (self.local / WDS_INDEX).write_text(text)
        self.summary.shards = len(self._shards)
        self.summary.bytes = sum(s["filesize"] for s in self._shards)
        return self.summary


def open_writer(fmt: str, out: str, shard_bytes: int = DEFAULT_SHARD_BYTES, compression: str | None = None) -> ShardWriter:
    if fmt == "mds":
        return MDSShardWriter(out, shard_bytes, compression)
    if fmt == "wds":
        if compression:
            raise ValueError("WebDataset shards are written as plain tars: compression is for mds only")
        return WDSShardWriter(out, shard_bytes)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def detect_format(path: str) -> str:
    """``mds`` when ``index.json`` is there, ``wds`` when ``shardindex.json`` is."""
    path = str(path).rstrip("/")
    if is_remote(path):
        fs = s3_filesystem()
        exists = lambda name: fs.exists(f"{path}/{name}")  # noqa: E731
    else:
        exists = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    if exists(MDS_INDEX):
        return "mds"
    if exists(WDS_INDEX):
        return "wds"
    raise FileNotFoundError(f"{path}: neither {MDS_INDEX} (MDS) nor {WDS_INDEX} (WebDataset) found")
