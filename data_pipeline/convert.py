"""``crossflow data convert`` and ``crossflow data features``: sources -> shards, shards -> shards
with precomputed 16-bit features (text token embeddings and mask, image latents).

Features are computed in batches (on a GPU when one is present) and stored once, so training
reads them instead of running the text encoder and the autoencoder every step.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from data_pipeline.sources import RawSample, Skipped, SourceItem, decode_rgb
from data_pipeline.writers import DEFAULT_SHARD_BYTES, WriteSummary, open_writer

ON_ERROR = ("skip", "raise")


@dataclass
class ConvertSummary:
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list = field(default_factory=list)

    def add_skip(self, item: Skipped) -> None:
        self.skipped += 1
        self.reasons[item.reason.split(" (")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{item.key}: {item.reason}")

    def absorb(self, w: WriteSummary) -> None:
        self.samples, self.shards, self.bytes = w.samples, w.shards, w.bytes

    def text(self, out: str) -> str:
        lines = [f"wrote {self.samples} samples in {self.shards} shards ({self.bytes / 2**20:.2f} MiB) to {out}",
                 f"skipped {self.skipped} samples" + (":" if self.skipped else "")]
        lines += [f"  {n:>8}  {reason}" for reason, n in self.reasons.most_common()]
        lines += [f"  e.g. {e}" for e in self.examples]
        return "\n".join(lines)


def parse_size(text: str | int) -> int:
    """``64MB``, ``512KiB``, ``1g`` or a plain number of bytes -> bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().lower().replace("ib", "b")
    units = {"k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "b": 1}
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


class Featurizer:
    """Adds ``text_emb``/``text_mask`` and/or ``latent`` to a batch of records."""

    def __init__(self, text_encoder=None, max_tokens: int = 77, image_encoder=None, resolution: int | None = None):
        self.text_encoder, self.max_tokens = text_encoder, max_tokens
        self.image_encoder, self.resolution = image_encoder, resolution

    def __call__(self, records: list[dict]) -> list[dict]:
        if self.text_encoder is not None:
            emb, mask = self.text_encoder.encode([r["caption"] for r in records], self.max_tokens)
            for r, e, m in zip(records, emb, mask):
                r["text_emb"], r["text_mask"] = e.astype(np.float16), m.astype(bool)
        if self.image_encoder is not None:
            images = [decode_rgb(r["image"], self.resolution) for r in records]
            if len({im.shape for im in images}) > 1:
                raise ValueError(f"images of different sizes {sorted({im.shape for im in images})}: "
                                 f"give a resolution to resize them before the autoencoder")
            for r, lat in zip(records, self.image_encoder.encode(np.stack(images))):
                r["latent"] = lat
        return records


def _batched(it: Iterable, n: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) == n:
            yield buf
            buf = []
    if buf:
        yield buf


def _progress(total: int | None, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="sample", file=sys.stderr, disable=None, dynamic_ncols=True)


def convert(items: Iterable[SourceItem], fmt: str, out: str, *, shard_bytes: int = DEFAULT_SHARD_BYTES,
            compression: str | None = None, featurizer: Featurizer | None = None, batch_size: int = 64,
            on_error: str = "skip", total: int | None = None, progress: bool = True) -> ConvertSummary:
    """Write every usable source item into shards; count (or raise on) the rest."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    summary = ConvertSummary()
    writer = open_writer(fmt, out, shard_bytes, compression)
    bar = _progress(total, f"convert -> {fmt}") if progress else None

    def good_records() -> Iterator[dict]:
        for item in items:
            if bar is not None:
                bar.update(1)
            if isinstance(item, Skipped):
                if on_error == "raise":
                    raise ValueError(f"bad sample {item.key}: {item.reason}")
                summary.add_skip(item)
                continue
            assert isinstance(item, RawSample)
            yield {"key": item.key, "caption": item.caption, "image": item.image, "image_ext": item.image_ext,
                   "meta": item.meta}

    try:
        for batch in _batched(good_records(), batch_size):
            for rec in featurizer(batch) if featurizer else batch:
                writer.write(rec)
        summary.absorb(writer.close())
    finally:
        if bar is not None:
            bar.close()
    return summary


def add_features(src: str, out: str, *, fmt: str | None = None, featurizer: Featurizer, batch_size: int = 64,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, compression: str | None = None,
                 cache_dir: str | None = None, progress: bool = True) -> ConvertSummary:
    """Read every record of ``src`` (MDS or WebDataset), add features, write ``out`` (same
    format unless ``fmt`` says otherwise). Columns of the encoders given are (re)computed;
    feature columns already stored for the others are carried over unchanged."""
    from data_pipeline.readers import read_records
    from data_pipeline.writers import detect_format
    src_fmt = detect_format(src)
    records = read_records(src, src_fmt, cache_dir)
    summary = ConvertSummary()
    writer = open_writer(fmt or src_fmt, out, shard_bytes, compression)
    bar = _progress(None, "features") if progress else None
    try:
        for batch in _batched(records, batch_size):
            for rec in featurizer(batch):
                writer.write(rec)
            if bar is not None:
                bar.update(len(batch))
        summary.absorb(writer.close())
    finally:
        if bar is not None:
            bar.close()
    return summary
