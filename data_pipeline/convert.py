"""``crossflow data convert``: sources -> shards, optionally with precomputed 16-bit features
(text token embeddings and mask, image latents) and their ``crossflow_features.json``.
``crossflow data features`` (shards -> shards, many processes, resumable) is in
:mod:`data_pipeline.feature_jobs`.

Features are computed in batches (on a GPU when one is present) and stored once, so training
reads them instead of running the text encoder and the autoencoder every step.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from data_pipeline.features import LatentStats
from data_pipeline.metadata import DEFAULT_MAX_TOKENS, FeatureMetadata, write_feature_metadata
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
    features: FeatureMetadata | None = None  # what the featurizer stored (also in crossflow_features.json)

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
        if self.features is not None:
            from data_pipeline.feature_jobs import feature_report
            lines += feature_report(self.features)
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
    """Adds ``text_emb``/``text_mask`` and/or ``latent`` to a batch of records; keeps the stored
    latents' running statistics and describes what it made (``metadata()``)."""

    def __init__(self, text_encoder=None, max_tokens: int = DEFAULT_MAX_TOKENS, image_encoder=None,
                 resolution: int | None = None):
        self.text_encoder, self.max_tokens = text_encoder, max_tokens
        self.image_encoder, self.resolution = image_encoder, resolution
        self.latent_stats = LatentStats()
        self.image_side: int | None = None  # side of the images fed to the autoencoder
        self.latent_shape: tuple[int, ...] | None = None

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
            latents = self.image_encoder.encode(np.stack(images))  # (B, C, h, w)
            self.latent_stats.add(latents)
            self.image_side, self.latent_shape = images[0].shape[0], latents.shape[1:]
            for r, lat in zip(records, latents):
                r["latent"] = lat
        return records

    def metadata(self) -> FeatureMetadata:
        """What this featurizer stored (text and/or latent specs, latent std/mean so far)."""
        meta = FeatureMetadata()
        if self.text_encoder is not None:
            meta.text = self.text_encoder.spec(self.max_tokens)
        if self.image_encoder is not None and self.latent_shape is not None:
            meta.latent = self.image_encoder.spec(self.image_side, self.latent_shape, self.latent_stats)
        return meta


def batched(it: Iterable, n: int) -> Iterator[list]:
    """Lists of ``n`` items (the last one shorter) from an iterable."""
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
        for batch in batched(good_records(), batch_size):
            for rec in featurizer(batch) if featurizer else batch:
                writer.write(rec)
        summary.absorb(writer.close())
        if featurizer is not None:
            summary.features = featurizer.metadata()
            write_feature_metadata(out, summary.features)
    finally:
        if bar is not None:
            bar.close()
    return summary
