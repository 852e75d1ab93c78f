"""Shard readers: MDS through mosaicml-streaming, WebDataset tars through a planned iterable,
both yielding the batch dict of :mod:`data_pipeline.datasets` (``image`` or ``latent``,
``text_emb``, ``text_mask``, ``caption``), from a folder or ``s3://`` with a local cache.

``build_shard_loader(...)`` is the one entry point the trainer calls. ``iter(loader)`` runs ONE
epoch; iterate again for the next (reshuffled with the epoch number). ``loader.state_dict()``
at any batch boundary and ``load_state_dict()`` on a fresh loader continue exactly where it
stopped:

* MDS: StreamingDataset/StreamingDataLoader's own resumption (epoch, sample offset, canonical
  nodes, seed). Sample-exact for any world size; samples skipped under ``on_error: skip`` count
  as consumed, so the offset stays true.
* WebDataset: sample-exact too, for the same ``num_workers`` and world size (checked). The
  epoch is a plan: shards in a seeded order dealt round-robin to (rank, worker) slots, each shard
  read whole and permuted with a seed of (seed, epoch, shard). A worker's position is (shard,
  sample) in its plan; the state keeps every worker's position and which worker yields next, and
  a resumed DataLoader's worker ``p`` plays the role of worker ``(p + next) % num_workers``, which
  reproduces torch's round-robin order. Shuffling is therefore shard order + within-shard, not a
  cross-shard buffer. Batches are formed inside each worker, so ``drop_last`` drops each worker's
  last partial batch: up to ``num_workers * (batch_size - 1)`` samples per rank and epoch.

Bad data (``on_error``): ``raise`` stops with :class:`BadDataError` naming the shard and the
sample; ``skip`` drops the sample (or every sample of a missing or truncated shard), counts it
in ``loader.skipped`` and logs a warning per batch that lost samples: a batch can then be short.
Never a silent hang, never a silently shorter epoch: a background download failure ends the
epoch with an error, not an early stop.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import math
import os
import tarfile
import tempfile
from collections import Counter
from pathlib import Path
from time import time_ns
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from data_pipeline.metadata import DEFAULT_MAX_TOKENS
from data_pipeline.s3 import check_bucket, is_remote, s3_filesystem, sync_endpoint_env
from data_pipeline.shapes import image_to_tensor_array
from data_pipeline.sources import decode_rgb
from data_pipeline.writers import FEATURE_COLUMNS, MDS_INDEX, WDS_INDEX, detect_format, npy_load

log = logging.getLogger(__name__)
ON_ERROR = ("raise", "skip")
SKIP_KEY, RAW_KEY, WORKER_KEY, POS_KEY = "_skipped", "_raw", "_worker", "_pos"


class BadDataError(RuntimeError):
    """A sample or shard cannot be read; the message names the shard and the sample."""


# ---------------------------------------------------------------------------------------------
# record -> sample


def record_from_mds(raw: dict) -> dict:
    """MDS columns -> the writer's record (mask back to bool)."""
    rec = dict(raw)
    if "text_mask" in rec:
        rec["text_mask"] = np.asarray(rec["text_mask"]).astype(bool)
    return rec


def record_from_wds(key: str, members: dict[str, bytes], where: str) -> dict:
    """Tar members of one sample -> the writer's record; raises ValueError on anything malformed."""
    if "txt" not in members:
        raise ValueError("no caption (.txt member)")
    try:
        caption = members["txt"].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption is not text ({e})") from e
    ext = next((e for e in members if "." not in e and e not in ("txt", "json")), None)
    rec: dict[str, Any] = {"key": key, "caption": caption, "image": members.get(ext, b""), "image_ext": ext or ""}
    rec["meta"] = json.loads(members["json"]) if "json" in members else {}
    for c in FEATURE_COLUMNS:
        if f"{c}.npy" in members:
            rec[c] = npy_load(members[f"{c}.npy"])
    return rec


def decode_image(data: bytes, resolution: int | None) -> np.ndarray:
    """Encoded image -> (3, H, W) float32 in [-1, 1]; center-crop and resize to ``resolution``."""
    return image_to_tensor_array(decode_rgb(data, resolution))


def record_to_sample(rec: dict, resolution: int | None = None) -> dict:
    """The batch format of one sample (see data_pipeline.datasets)."""
    cap = rec.get("caption")
    if not isinstance(cap, str):
        raise ValueError(f"caption is not text ({type(cap).__name__})")
    if not cap.strip():
        raise ValueError("empty caption")
    out: dict[str, Any] = {"caption": cap}
    if "latent" in rec:
        out["latent"] = torch.from_numpy(np.asarray(rec["latent"], dtype=np.float32))  # (C, h, w)
    else:
        if not rec.get("image"):
            raise ValueError("no image")
        try:
            out["image"] = torch.from_numpy(decode_image(rec["image"], resolution))  # (3, H, W)
        except Exception as e:
            raise ValueError(f"corrupt image ({type(e).__name__}: {e})") from e
    if "text_emb" in rec:
        out["text_emb"] = torch.from_numpy(np.asarray(rec["text_emb"], dtype=np.float32))  # (n, d)
        out["text_mask"] = torch.from_numpy(np.asarray(rec["text_mask"], dtype=bool))  # (n,)
    return out


def collate_samples(items: list[dict]) -> dict:
    """Stack good samples; skip markers become the batch's ``_skipped`` reasons. ``_raw`` is the
    number of sample positions the batch consumed, skipped ones included (resume counts them)."""
    good = [s for s in items if SKIP_KEY not in s]
    batch = default_collate(good) if good else {}
    batch[SKIP_KEY] = [s[SKIP_KEY] for s in items if SKIP_KEY in s]
    batch[RAW_KEY] = len(items)
    return batch


class _Featurizer:
    """Adds ``text_emb``/``text_mask`` in the main process when the shards carry none."""

    def __init__(self, text_encoder, max_tokens: int):
        self.spec, self.max_tokens, self._enc = text_encoder, max_tokens, None

    def __call__(self, batch: dict) -> dict:
        if "text_emb" in batch or not batch.get("caption"):
            return batch
        if self.spec is None:
            raise BadDataError("these shards hold no text features (text_emb); pass a text encoder to the loader "
                               "(data.text_encoder) or add them once with `crossflow data features`")
        if self._enc is None:
            from data_pipeline.features import TextEncoder, load_text_encoder
            if isinstance(self.spec, TextEncoder):
                self._enc = self.spec
            elif callable(self.spec):
                self._enc = self.spec()
            else:
                self._enc = load_text_encoder(self.spec)
        emb, mask = self._enc.encode(list(batch["caption"]), self.max_tokens)
        batch["text_emb"] = torch.from_numpy(emb.astype(np.float32))  # (B, n, d)
        batch["text_mask"] = torch.from_numpy(mask)  # (B, n)
        return batch


class _SkipTally:
    def __init__(self):
        self.count = 0
        self.reasons: Counter = Counter()
        self.examples: list[str] = []

    def add(self, skipped: list[str]) -> None:
        if not skipped:
            return
        self.count += len(skipped)
        for s in skipped:
            self.reasons[s.rsplit(": ", 1)[-1].split(" (")[0]] += 1
            if len(self.examples) < 20:
                self.examples.append(s)
        log.warning("skipped %d bad sample(s) in this batch (%d so far): %s", len(skipped), self.count, skipped[0])

    def summary(self) -> dict:
        return {"skipped": self.count, "reasons": dict(self.reasons), "examples": list(self.examples)}


# ---------------------------------------------------------------------------------------------
# MDS


@contextlib.contextmanager
def _world_env(rank: int, world_size: int):
    """mosaicml-streaming reads the world from RANK/WORLD_SIZE/LOCAL_*: set them while the
    dataset is built when absent (restored after), and refuse a contradiction (a wrong partition
    would silently duplicate or drop samples)."""
    want = {"RANK": rank, "WORLD_SIZE": world_size}
    for name, value in want.items():
        have = os.environ.get(name)
        if have is not None and int(have) != value:
            raise ValueError(f"{name}={have} in the environment but the loader was asked for {value}")
    want.update(LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world_size)
    added = [k for k in want if k not in os.environ]
    for k in added:
        os.environ[k] = str(want[k])
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _make_mds_dataset_class():
    from streaming import StreamingDataset
    from streaming.base.dataset import _ShardState

    class CrossflowMDSDataset(StreamingDataset):
        """StreamingDataset that decodes records into samples, names the shard and sample of
        every failure, skips-and-counts under ``on_error=skip``, checks shard sizes against the
        index (a truncated shard), and turns a failed background download into an error instead
        of streaming's silent early end of the epoch."""

        def __init__(self, *, on_error: str, resolution: int | None, **kwargs):
            self.on_error, self.resolution = on_error, resolution
            self._bad_shards: dict[int, str] = {}
            self._checked_shards: set[int] = set()
            self._background_error: BaseException | None = None
            super().__init__(**kwargs)

        def _where(self, shard_id: int, idx: int | None = None) -> str:
            stream = self.streams[self.stream_per_shard[shard_id]]
            name = self.shards[shard_id].raw_data.basename
            loc = f"{stream.remote or stream.local}/{name}"
            return f"shard {loc}" + (f" sample {idx}" if idx is not None else "")

        def _check_size(self, shard_id: int) -> None:
            if shard_id in self._checked_shards:
                return
            shard = self.shards[shard_id]
            stream = self.streams[self.stream_per_shard[shard_id]]
            raw = os.path.join(stream.local, stream.split, shard.raw_data.basename)
            if os.path.isfile(raw):
                size = os.path.getsize(raw)
                if size != shard.raw_data.bytes:
                    raise BadDataError(f"{self._where(shard_id)} is truncated or damaged: {size} bytes, "
                                       f"the index says {shard.raw_data.bytes}")
                self._checked_shards.add(shard_id)

        def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
            if shard_id in self._bad_shards:
                return
            try:
                super().prepare_shard(shard_id, blocking)
                self._check_size(shard_id)
            except Exception as e:
                reason = e if isinstance(e, BadDataError) else BadDataError(
                    f"{self._where(shard_id)} cannot be read: {type(e).__name__}: {e}")
                # Streaming left the shard PREPARING, and other workers and ranks wait on it: a blocking
                # prepare_shard while it is PREPARING, a ready thread until it is LOCAL (back to REMOTE
                # stranded those forever). LOCAL releases both; the file is still missing or damaged, so
                # whoever reads it next downloads it again (streaming does, for a LOCAL shard without
                # its file) or checks its size, and fails here too, or skips its samples.
                self._shard_states[shard_id] = _ShardState.LOCAL
                if self.on_error != "skip":
                    raise reason from e
                self._bad_shards[shard_id] = str(reason)

        def get_item(self, sample_id: int, retry: int = 7) -> Any:
            shard_id, idx = self.spanner[sample_id]
            where = self._where(shard_id, idx)
            try:
                if shard_id in self._bad_shards:
                    raise BadDataError(self._bad_shards[shard_id])
                try:
                    rec = record_from_mds(self._raw_item(shard_id, idx, retry))
                except UnicodeDecodeError as e:  # the str columns: caption, key, image_ext
                    raise ValueError(f"caption is not text ({e})") from e
                where += f" (key {rec.get('key')!r})"
                return record_to_sample(rec, self.resolution)
            except Exception as e:
                if self.on_error == "skip":
                    return {SKIP_KEY: f"{where}: {e}"}
                if isinstance(e, BadDataError):
                    raise
                raise BadDataError(f"{where}: {e}") from e

        def _raw_item(self, shard_id: int, idx: int, retry: int) -> dict:
            """streaming's get_item without its failure path (which stops every thread of the
            epoch): a shard that cannot be prepared raises here (or is marked bad under skip)."""
            shard = self.shards[shard_id]
            for _ in range(1 + retry):
                if shard_id in self._bad_shards:
                    raise BadDataError(self._bad_shards[shard_id])
                try:
                    self._check_size(shard_id)  # once per shard and process: local shards skip prepare_shard
                except BadDataError as e:
                    if self.on_error != "skip":
                        raise
                    self._bad_shards[shard_id] = str(e)
                    continue
                try:
                    sample = shard[idx]
                    self._shard_access_times[shard_id] = time_ns()
                    return sample
                except FileNotFoundError:
                    self.prepare_shard(shard_id)
            raise BadDataError(f"{self._where(shard_id, idx)}: shard file keeps disappearing (cache_limit too low?)")

        # streaming's epoch end (_Iterator.exit) waits for its three loops to report their exit;
        # a background thread that raises never does, and the epoch would hang. Report it anyway.
        def _prepare_thread(self, it) -> None:
            try:
                super()._prepare_thread(it)
            except BaseException:
                it.on_exit()
                raise

        def _ready_thread(self, it) -> None:
            try:
                super()._ready_thread(it)
            except BaseException:
                it.on_exit()
                raise

        def on_exception(self, future) -> None:
            if future.exception() is not None and self._background_error is None:
                self._background_error = future.exception()
            super().on_exception(future)

        def __iter__(self) -> Iterator[dict]:
            yield from super().__iter__()
            if self._background_error is not None or (hasattr(self, "_event") and self._event.is_set()):
                err = self._background_error
                raise BadDataError(f"reading {self.streams[0].remote or self.streams[0].local} failed in the "
                                   f"background: {err}") from err

    return CrossflowMDSDataset


class MDSLoader(DataLoader):
    """StreamingDataLoader's resumption with skip-aware counting and text featurization.
    One epoch per ``iter()``."""

    def __init__(self, dataset, batch_size: int, num_workers: int, drop_last: bool, featurize: _Featurizer,
                 timeout: float, world_size: int = 1):
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last,
                         collate_fn=collate_samples, persistent_workers=False,
                         timeout=timeout if num_workers else 0)
        self.num_samples_yielded = 0
        self.world_size = world_size
        self.featurize = featurize
        self.tally = _SkipTally()

    @property
    def skipped(self) -> dict:
        return self.tally.summary()

    def __iter__(self) -> Iterator[dict]:
        # Forked workers must not share the parent's kept-alive S3 connection (seen on RGW: corrupt
        # or stalled reads in ~40% of runs): drop every stream's client before the fork.
        for stream in self.dataset.streams:
            stream._downloader.clean_up()
        self.num_samples_yielded = 0
        for batch in super().__iter__():
            self.num_samples_yielded += batch.pop(RAW_KEY)
            self.tally.add(batch.pop(SKIP_KEY))
            if "caption" not in batch:
                continue  # every sample of this batch was skipped
            yield self.featurize(batch)

    def state_dict(self) -> dict:
        # Every rank yields the same count (streaming pads the partition), so the global offset
        # is this rank's count times the world size.
        return self.dataset.state_dict(self.num_samples_yielded * self.world_size, False)

    def load_state_dict(self, obj: dict) -> None:
        self.dataset.load_state_dict(obj)

    def close(self) -> None:
        """Release the dataset's shared memory now rather than at the process's exit."""
        release_shared_memory(self.dataset)


# ---------------------------------------------------------------------------------------------
# WebDataset


def read_wds_index(path: str) -> dict:
    path = path.rstrip("/")
    try:
        if is_remote(path):
            text = s3_filesystem().cat_file(f"{path}/{WDS_INDEX}")
        else:
            text = Path(path, WDS_INDEX).read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}/{WDS_INDEX} not found: WebDataset shards need the index that "
                                f"`crossflow data convert --format wds` writes (convert third-party tars with "
                                f"`crossflow data convert --source wds`)") from e
    index = json.loads(text)
    if not index.get("shardlist"):
        raise BadDataError(f"{path}/{WDS_INDEX} lists no shards")
    return index


def _tar_samples(data: bytes) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {column: bytes}) per sample, columns being the member name after the key's dot."""
    key, group = None, {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, _, col = m.name.partition(".")
            if k != key and key is not None:
                yield key, group
                group = {}
            key = k
            group[col] = tar.extractfile(m).read()
    if key is not None:
        yield key, group


class WDSShardDataset(IterableDataset):
    """One epoch of WebDataset shards as batches (batched inside the worker, so a batch's
    provenance, worker and position, travels with it). See the module docstring for the plan."""

    def __init__(self, path: str, batch_size: int, *, rank: int, world_size: int, shuffle: bool, seed: int,
                 cache_dir: str | None, on_error: str, drop_last: bool, resolution: int | None):
        self.path = path.rstrip("/")
        self.index = read_wds_index(self.path)
        self.shards = self.index["shardlist"]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle, self.seed, self.cache_dir = shuffle, seed, cache_dir
        self.on_error, self.drop_last, self.resolution = on_error, drop_last, resolution
        self.epoch = 0
        self.positions: dict[int, tuple[int, int]] = {}  # logical worker -> (shard pos, sample pos)
        self.rotation = 0

    def shard_order(self, epoch: int) -> list[int]:
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return order.tolist()

    def worker_shards(self, epoch: int, logical: int, num_workers: int) -> list[int]:
        slots = self.world_size * num_workers
        return self.shard_order(epoch)[self.rank * num_workers + logical::slots]

    def _fetch(self, name: str) -> bytes:
        url = f"{self.path}/{name}"
        if not is_remote(url):
            return Path(url).read_bytes()
        if self.cache_dir:
            local = Path(self.cache_dir, name)
            if not local.is_file():
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_suffix(f".tmp{os.getpid()}")
                self._fs().get_file(url, str(tmp))
                os.replace(tmp, local)
            return local.read_bytes()
        return self._fs().cat_file(url)

    def _fs(self):
        if getattr(self, "_s3", None) is None or self._s3_pid != os.getpid():
            self._s3, self._s3_pid = s3_filesystem(), os.getpid()  # one per process: no shared connections
        return self._s3

    def _shard_records(self, shard_id: int) -> Iterator[tuple[int, dict | str]]:
        """(sample index in shard, record or error string) for every sample the index promises."""
        info = self.shards[shard_id]
        name, n = info["url"], int(info["nsamples"])
        where = f"shard {self.path}/{name}"
        try:
            data = self._fetch(name)
            if "filesize" in info and len(data) != info["filesize"]:
                raise BadDataError(f"{where} is truncated or damaged: {len(data)} bytes, the index says {info['filesize']}")
            groups = list(_tar_samples(data))
            if len(groups) != n:
                raise BadDataError(f"{where} holds {len(groups)} samples, the index says {n}")
        except Exception as e:
            err = e if isinstance(e, BadDataError) else BadDataError(f"{where} cannot be read: {type(e).__name__}: {e}")
            if self.on_error != "skip":
                raise err from e
            for j in range(n):
                yield j, f"{err} (sample {j} lost)"
            return
        for j, (key, members) in enumerate(groups):
            try:
                yield j, record_from_wds(key, members, where)
            except Exception as e:
                yield j, f"{where} sample {j} (key {key!r}): {e}"

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        pid, num_workers = (info.id, info.num_workers) if info else (0, 1)
        logical = (pid + self.rotation) % num_workers
        my_shards = self.worker_shards(self.epoch, logical, num_workers)
        start_shard, start_sample = self.positions.get(logical, (0, 0))
        items: list[dict] = []
        for si in range(start_shard, len(my_shards)):
            shard_id = my_shards[si]
            n = int(self.shards[shard_id]["nsamples"])
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, shard_id]).permutation(n)
            first = start_sample if si == start_shard else 0
            if first >= n:
                continue
            records = dict(self._shard_records(shard_id))
            for j in range(first, n):
                rec = records[int(order[j])]
                items.append(self._sample(rec))
                if len(items) == self.batch_size:
                    yield self._batch(items, logical, si, j + 1)
                    items = []
        if items and not self.drop_last:
            yield self._batch(items, logical, len(my_shards), 0)

    def _sample(self, rec: dict | str) -> dict:
        if isinstance(rec, str):
            if self.on_error == "skip":
                return {SKIP_KEY: rec}
            raise BadDataError(rec)
        try:
            return record_to_sample(rec, self.resolution)
        except Exception as e:
            msg = f"shard {self.path} sample key {rec.get('key')!r}: {e}"
            if self.on_error == "skip":
                return {SKIP_KEY: msg}
            raise BadDataError(msg) from e

    def _batch(self, items: list[dict], logical: int, shard_pos: int, sample_pos: int) -> dict:
        batch = collate_samples(items)
        batch[WORKER_KEY] = logical
        batch[POS_KEY] = (shard_pos, sample_pos)
        return batch


class WDSLoader:
    """DataLoader over :class:`WDSShardDataset` with sample-exact ``state_dict``. One epoch per ``iter()``."""

    def __init__(self, dataset: WDSShardDataset, num_workers: int, featurize: _Featurizer, timeout: float):
        self.dataset, self.num_workers, self.featurize, self.timeout = dataset, num_workers, featurize, timeout
        self.epoch = 0
        self.positions: dict[int, tuple[int, int]] = {}
        self.next_worker = 0
        self.tally = _SkipTally()

    @property
    def skipped(self) -> dict:
        return self.tally.summary()

    def __len__(self) -> int:
        total = sum(int(s["nsamples"]) for s in self.dataset.shards)
        return math.ceil(total / self.dataset.world_size / self.dataset.batch_size)

    def __iter__(self) -> Iterator[dict]:
        ds, W = self.dataset, max(1, self.num_workers)
        ds.epoch, ds.positions, ds.rotation = self.epoch, dict(self.positions), self.next_worker
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                            timeout=self.timeout if self.num_workers else 0)
        for batch in loader:
            logical = batch.pop(WORKER_KEY)
            self.positions[logical] = tuple(int(v) for v in batch.pop(POS_KEY))
            self.next_worker = (logical + 1) % W
            batch.pop(RAW_KEY)
            self.tally.add(batch.pop(SKIP_KEY))
            if "caption" not in batch:
                continue
            yield self.featurize(batch)
        self.epoch += 1
        self.positions, self.next_worker = {}, 0

    def state_dict(self) -> dict:
        ds = self.dataset
        return {"format": "wds", "epoch": self.epoch, "next_worker": self.next_worker,
                "positions": {str(k): list(v) for k, v in self.positions.items()},
                "num_workers": self.num_workers, "world_size": ds.world_size, "seed": ds.seed,
                "shuffle": ds.shuffle, "batch_size": ds.batch_size, "num_shards": len(ds.shards)}

    def load_state_dict(self, obj: dict) -> None:
        ds = self.dataset
        mine = {"num_workers": self.num_workers, "world_size": ds.world_size, "seed": ds.seed,
                "shuffle": ds.shuffle, "batch_size": ds.batch_size, "num_shards": len(ds.shards)}
        diff = {k: (obj.get(k), v) for k, v in mine.items() if obj.get(k) != v}
        if diff:
            raise ValueError("WebDataset resume needs the same " + ", ".join(
                f"{k} (saved {a}, now {b})" for k, (a, b) in diff.items()))
        self.epoch, self.next_worker = int(obj["epoch"]), int(obj["next_worker"])
        self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in obj["positions"].items()}


# ---------------------------------------------------------------------------------------------
# entry point


def build_shard_loader(path: str, fmt: str, batch_size: int, *, rank: int = 0, world_size: int = 1,
                       num_workers: int = 0, shuffle: bool = True, seed: int = 0, cache_dir: str | None = None,
                       on_error: str = "raise", drop_last: bool = True, resolution: int | None = None,
                       text_encoder=None, max_tokens: int = DEFAULT_MAX_TOKENS, timeout: float = 600.0):
    """A loader over MDS (``fmt="mds"``) or WebDataset (``"wds"``; ``"auto"`` looks at the index)
    shards at a local folder or ``s3://bucket/prefix``.

    ``iter(loader)`` yields one epoch of batch dicts of ``batch_size`` samples (per rank); a new
    ``iter`` starts the next epoch. ``state_dict()`` / ``load_state_dict()`` resume mid-epoch.
    ``cache_dir`` is where remote shards are cached (required for MDS from S3). Shards without
    text features get them from ``text_encoder`` (a spec for ``load_text_encoder``, an encoder,
    or a function returning one, called at the first such batch) in the main process. ``resolution`` resizes decoded images (None keeps them).
    ``timeout`` bounds the wait for one batch from a worker, so a stuck read fails instead of
    hanging.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    path = str(path).rstrip("/")
    if is_remote(path):
        sync_endpoint_env()
        check_bucket(path)
    elif not Path(path).is_dir():
        raise FileNotFoundError(f"dataset folder not found: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    featurize = _Featurizer(text_encoder, max_tokens)
    if fmt == "wds":
        ds = WDSShardDataset(path, batch_size, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed,
                             cache_dir=cache_dir, on_error=on_error, drop_last=drop_last, resolution=resolution)
        return WDSLoader(ds, num_workers, featurize, timeout)
    if fmt != "mds":
        raise ValueError(f"format must be mds, wds or auto, got {fmt!r}")
    remote, local = (path, cache_dir) if is_remote(path) else (None, path)
    if remote and not cache_dir:
        raise ValueError(f"reading MDS from {path} needs a local cache_dir")
    if remote:
        _check_remote_index(path)
    cls = _make_mds_dataset_class()
    with _world_env(rank, world_size):
        ds = cls(remote=remote, local=local, batch_size=batch_size, shuffle=shuffle, shuffle_seed=seed,
                 on_error=on_error, resolution=resolution, download_retry=1)
    return MDSLoader(ds, batch_size, num_workers, drop_last, featurize, timeout, world_size)


def _check_remote_index(path: str) -> None:
    if not s3_filesystem().exists(f"{path}/{MDS_INDEX}"):
        raise FileNotFoundError(f"{path}/{MDS_INDEX} not found: not an MDS dataset (write one with "
                                f"`crossflow data convert --format mds --out {path}`)")


def read_records(path: str, fmt: str = "auto", cache_dir: str | None = None) -> Iterator[dict]:
    """Every stored record in write order (no decoding, no shuffling): for round-trip checks and
    ``crossflow data features``."""
    path = str(path).rstrip("/")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "wds":
        ds = WDSShardDataset(path, 1, rank=0, world_size=1, shuffle=False, seed=0, cache_dir=cache_dir,
                             on_error="raise", drop_last=False, resolution=None)
        for shard_id in range(len(ds.shards)):
            for _, rec in ds._shard_records(shard_id):
                if isinstance(rec, str):
                    raise BadDataError(rec)
                yield rec
        return
    import shutil
    import tempfile

    from streaming import StreamingDataset
    remote, local = (path, cache_dir) if is_remote(path) else (None, path)
    own_cache = bool(remote and local is None)
    if own_cache:
        local = tempfile.mkdtemp(prefix="crossflow-mds-cache-")
    try:
        ds = StreamingDataset(remote=remote, local=local, shuffle=False, batch_size=1)
        try:
            for i in range(ds.num_samples):
                yield record_from_mds(ds[i])
        finally:
            for stream in ds.streams:
                stream._downloader.clean_up()
            release_shared_memory(ds)
    finally:
        if own_cache:
            shutil.rmtree(local, ignore_errors=True)


def release_shared_memory(dataset) -> None:
    """Close (and, where this process created them, unlink) the shared-memory blocks a
    StreamingDataset opened. streaming registers each block's cleanup with ``atexit`` only, which
    keeps them open for the life of the process (6 descriptors per dataset), and each new dataset
    opens, and keeps, the blocks of every one still there while it picks its prefix: a process that
    makes many datasets (describing shards before every launch, a sweep's driver, the test suite)
    ran out of file descriptors. Call it once nothing reads the dataset any more (other
    processes that mapped a block keep their mapping). Leans on streaming 0.13's attribute layout
    (SharedArray.shm, SharedScalar.arr, SharedBarrier._arr): hence the <0.14 bound in setup.cfg."""
    import atexit

    from streaming.base.shared.memory import SharedMemory

    def blocks(obj, depth: int = 0):
        if isinstance(obj, SharedMemory):
            yield obj
        elif depth < 3 and hasattr(obj, "__dict__") and type(obj).__module__.startswith("streaming."):
            for value in vars(obj).values():
                yield from blocks(value, depth + 1)

    for value in list(vars(dataset).values()):
        for shm in blocks(value):
            atexit.unregister(shm.cleanup)
            shm.cleanup()


def iterate_forever(loader) -> Iterator[dict]:
    """Batches epoch after epoch; ``loader.state_dict()`` taken between two ``next()`` calls
    resumes exactly after the last batch handed out. An epoch resumed at its very end yields
    nothing and the next one starts; two empty epochs in a row mean this rank has no data."""
    empty = 0
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        empty = 0 if got else empty + 1
        if empty >= 2:
            raise ValueError("the shard loader yields no batch for this rank: fewer samples per rank than one "
                             "batch, or every sample was skipped")


def describe_shards(path: str, fmt: str = "auto", cache_dir: str | None = None) -> dict:
    """Shapes of the first stored sample: ``{"format", "text_emb": (n, d) | None, "latent":
    (C, h, w) | None, "image": (H, W) | None}``: what the model must be built for."""
    path = str(path).rstrip("/")
    if is_remote(path):
        sync_endpoint_env()
        check_bucket(path)
    if fmt == "auto":
        fmt = detect_format(path)
    records = read_records(path, fmt, cache_dir)
    try:
        rec = next(records)
    finally:
        records.close()  # removes a temporary cache at once
    image = None
    if rec.get("image"):
        with Image.open(io.BytesIO(rec["image"])) as im:
            image = (im.size[1], im.size[0])
    shape = lambda k: tuple(np.asarray(rec[k]).shape) if k in rec else None  # noqa: E731
    return {"format": fmt, "text_emb": shape("text_emb"), "latent": shape("latent"), "image": image}


CACHE_DIR_ENV = "CROSSFLOW_CACHE_DIR"  # node-local root of the default shard caches


def default_cache_dir(path: str, fmt: str, out_dir: str) -> str:
    """Where a run caches the remote shards at ``path`` without ``data.cache_dir``: node-local
    storage (``$CROSSFLOW_CACHE_DIR``, else the system temporary folder), never a run directory
    that nodes may share, in ``crossflow-shard-cache/<hash>``. The hash covers the remote path and
    the content of its index (another dataset of the same name, or one rewritten in place, gets a
    fresh folder, never a stale one) and the run directory (streaming refuses one local folder for
    two live datasets on a node, e.g. a sweep's concurrent runs; a resumed run finds its cache).
    Every rank of a node computes the same folder, which streaming's local leader fills for all."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    try:
        index = s3_filesystem().cat_file(f"{path.rstrip('/')}/{MDS_INDEX if fmt == 'mds' else WDS_INDEX}")
    except FileNotFoundError:
        index = b""  # the loader names the missing index
    key = hashlib.blake2s(digest_size=8)
    for part in (path.rstrip("/").encode(), index, str(Path(out_dir).resolve()).encode()):
        key.update(len(part).to_bytes(8, "little") + part)
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "crossflow-shard-cache")
    return os.path.join(root, key.hexdigest())


def shard_loader_from_config(data_cfg, batch_size: int, *, rank: int, world_size: int, seed: int,
                             out_dir: str):
    """``build_shard_loader`` from a ``trainer.config.DataConfig`` (source mds or wds): the one
    mapping of config keys to loader arguments. Shards without stored text features are
    featurized with ``data.text_encoder`` (its hidden layer and multiplier too); shards whose
    crossflow_features.json names other text settings fail here; images are resized to
    ``data.resolution``."""
    from data_pipeline.features import text_encoder_from_config
    from data_pipeline.metadata import check_text_settings, read_feature_metadata
    check_text_settings(data_cfg, read_feature_metadata(data_cfg.path).text, f"shards at {data_cfg.path}")
    cache_dir = data_cfg.cache_dir
    if cache_dir is None and is_remote(data_cfg.path):
        cache_dir = default_cache_dir(data_cfg.path, data_cfg.source, out_dir)
    return build_shard_loader(data_cfg.path, data_cfg.source, batch_size, rank=rank, world_size=world_size,
                              num_workers=data_cfg.num_workers, shuffle=data_cfg.shuffle, seed=seed,
                              cache_dir=cache_dir, on_error=data_cfg.on_error, drop_last=True,
                              resolution=data_cfg.resolution,
                              text_encoder=functools.partial(text_encoder_from_config, data_cfg),
                              max_tokens=data_cfg.max_tokens)
