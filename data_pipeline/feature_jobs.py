"""``crossflow data features`` at the scale of a real dataset: N processes (``--num-procs``) or
torchrun ranks (``RANK``/``WORLD_SIZE``), each featurizing its own input shards; resumable; one
merged index at the end.

The output folder (local or ``s3://``)::

    part-00000/                       features of input shard 0: its shards and its own index
    part-00001/                       (MDS index.json or WebDataset shardindex.json)
    _features_progress/plan.json      the input shards and the settings (a resumed run must match)
    _features_progress/done/part-00000.json   written once part-00000 is complete
    crossflow_features.json           how the features were made (data_pipeline.metadata)
    index.json | shardindex.json      the merged index, written last: the dataset is complete

Input shard ``i`` goes to rank ``i % world``. A part's completion marker is written (one object
on S3, a rename locally: atomic either way) only after the part's shards and index are complete.
The same command run again keeps every marked part, deletes and redoes any unmarked one, so no
sample is lost or duplicated, and the output equals an uninterrupted run's: a part depends only
on its input shard and the settings, whichever rank or attempt wrote it (bit for bit on the same
device kind and process count; on CPU a different ``--num-procs`` changes each process's thread
count, hence the order of float reductions: values can then differ in their last 16-bit place).
Rank 0 (the parent, with ``--num-procs``) merges the parts' indexes in input order once all
are done.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from typing import Callable, Iterator

import numpy as np

from data_pipeline.metadata import (DEFAULT_MAX_TOKENS, FeatureMetadata, LatentSpec, TextSpec,
                                    read_feature_metadata, write_feature_metadata)
from data_pipeline.convert import batched as _batched
from data_pipeline.s3 import check_bucket, is_remote, s3_filesystem, sync_endpoint_env
from data_pipeline.writers import MDS_INDEX, WDS_INDEX, detect_format, open_writer

PROGRESS_DIR = "_features_progress"
PLAN_FILE = f"{PROGRESS_DIR}/plan.json"
DONE_DIR = f"{PROGRESS_DIR}/done"
PLAN_WAIT_S = 3600.0  # torchrun ranks > 0 wait this long for rank 0's plan (its scale pass included)


@dataclass
class FeatureSettings:
    """What the features are made with; a resumed run must give the same (the device may change)."""
    text_encoder: str | None = None  # spec for load_text_encoder; None = keep the input's text features
    max_tokens: int = DEFAULT_MAX_TOKENS
    text_hidden_layer: int = -1
    text_multiplier: float = 1.0
    vae: str | None = None  # local AutoencoderKL folder; None = keep the input's latents
    latent_resolution: int | None = None  # resize images to this side before the autoencoder
    scaling_factor: float | str | None = None  # None: the VAE config's; "auto": 1 / measured std
    shift_factor: float | None = None  # None: the VAE config's
    scale_samples: int = 512  # samples of the first pass that measures the std for "auto"
    batch_size: int = 64
    format: str | None = None  # output format; None = the input's
    shard_bytes: int = 64 << 20
    compression: str | None = None

    def __post_init__(self):
        if self.vae:
            self.vae = str(Path(self.vae).expanduser().resolve())
        if self.text_encoder and Path(self.text_encoder).expanduser().exists():
            self.text_encoder = str(Path(self.text_encoder).expanduser().resolve())
        if self.scaling_factor is not None and self.scaling_factor != "auto":
            self.scaling_factor = float(self.scaling_factor)
            if self.scaling_factor <= 0:
                raise ValueError(f"scaling factor must be positive or 'auto', got {self.scaling_factor}")
        if not (self.text_encoder or self.vae):
            raise ValueError("nothing to compute: give a text encoder and/or a VAE")
        from data_pipeline.features import require_autoencoder_folder, require_text_encoder
        if self.vae:
            require_autoencoder_folder(self.vae)  # before any worker starts
        if self.text_encoder:
            require_text_encoder(self.text_encoder)


@dataclass
class FeaturesSummary:
    samples: int
    shards: int
    bytes: int
    parts: int
    resumed_parts: int  # parts found complete from an earlier attempt
    processed: int  # samples featurized by this attempt
    seconds: float  # this attempt, start-up and merge included
    metadata: FeatureMetadata

    def text(self, out: str) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else float("nan")
        lines = [f"wrote {self.samples} samples in {self.shards} shards ({self.bytes / 2**20:.2f} MiB) to {out}",
                 f"{self.parts} input shards, {self.resumed_parts} already done by an earlier run; "
                 f"{self.processed} samples featurized in {self.seconds:.1f} s ({rate:.1f} samples/s)"]
        return "\n".join(lines + feature_report(self.metadata))


def feature_report(meta: FeatureMetadata) -> list[str]:
    """Lines describing stored features, with the latents' measured std and mean."""
    lines = []
    if meta.latent is not None:
        lat = meta.latent
        lines.append(f"latents {'x'.join(map(str, lat.latent_shape))} from {lat.autoencoder} at {lat.resolution} px: "
                     f"z = (mean - {lat.shift_factor:g}) * {lat.scaling_factor:g}")
        if lat.std:
            lines.append(f"  stored latents: std {lat.std:.4f}, mean {lat.mean:.4f}; the scaling factor for std 1 "
                         f"is {lat.scaling_factor / lat.std:.5f} (--scaling-factor auto sets it)")
    if meta.text is not None:
        t = meta.text
        lines.append(f"text {t.max_tokens} tokens x {t.dim} from {t.encoder} "
                     f"(hidden layer {t.hidden_layer}, multiplier {t.multiplier:g})")
    return lines


# ---------------------------------------------------------------------------------------------
# the output folder, local or s3://


class _Store:
    """Small file operations under the output root; JSON writes are atomic."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/")
        self.remote = is_remote(self.root)
        if self.remote:
            if not self.root.startswith("s3://"):
                raise ValueError(f"only local folders and s3:// are supported, got {self.root}")
            sync_endpoint_env()
            check_bucket(self.root)
        self._fs = s3_filesystem() if self.remote else None

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def exists(self, rel: str) -> bool:
        if self.remote:
            self._fs.invalidate_cache()
            return self._fs.exists(self.path(rel))
        return os.path.exists(self.path(rel))

    def read_json(self, rel: str) -> dict:
        raw = self._fs.cat_file(self.path(rel)) if self.remote else Path(self.path(rel)).read_bytes()
        return json.loads(raw)

    def read_jsons(self, rels: list[str]) -> list[dict]:
        """Many small files; on S3 fetched concurrently (one request each, not one after another)."""
        if not self.remote:
            return [self.read_json(r) for r in rels]
        paths = [self.path(r) for r in rels]
        raw = self._fs.cat(paths)  # keyed by path without "s3://"
        return [json.loads(raw[self._fs._strip_protocol(p)]) for p in paths]

    def names(self, rel: str) -> set[str]:
        """File names in the folder ``rel`` (one listing, so polling a thousand markers is one request)."""
        if self.remote:
            self._fs.invalidate_cache()
            if not self._fs.exists(self.path(rel)):
                return set()
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self.path(rel), detail=False)}
        return set(os.listdir(self.path(rel))) if os.path.isdir(self.path(rel)) else set()

    def write_json(self, rel: str, obj: dict) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        if self.remote:
            self._fs.pipe_file(self.path(rel), data)  # one PUT: the object appears whole or not at all
            return
        target = Path(self.path(rel))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, target)

    def remove(self, rel: str) -> None:
        if self.remote:
            if self.exists(rel):
                self._fs.rm(self.path(rel), recursive=True)
        elif os.path.isdir(self.path(rel)):
            shutil.rmtree(self.path(rel))
        elif os.path.exists(self.path(rel)):
            os.unlink(self.path(rel))

    def is_empty(self) -> bool:
        if self.remote:
            self._fs.invalidate_cache()
            return not self._fs.find(self.root)
        return not os.path.isdir(self.root) or not any(Path(self.root).iterdir())


def part_name(i: int) -> str:
    return f"part-{i:05d}"


def _done_file(i: int) -> str:
    return f"{DONE_DIR}/{part_name(i)}.json"


# ---------------------------------------------------------------------------------------------
# input shards, read one at a time


def input_shards(src: str, fmt: str) -> list[dict]:
    """``[{"name", "samples"}, ...]`` in index order (MDS entries keep their index object)."""
    from data_pipeline.readers import read_wds_index
    if fmt == "wds":
        return [{"name": s["url"], "samples": int(s["nsamples"])} for s in read_wds_index(src)["shardlist"]]
    raw = s3_filesystem().cat_file(f"{src}/{MDS_INDEX}") if is_remote(src) else Path(src, MDS_INDEX).read_bytes()
    return [{"name": s["raw_data"]["basename"], "samples": int(s["samples"]), "mds": s}
            for s in json.loads(raw)["shards"]]


def _mds_shard_records(src: str, shard: dict, scratch: str) -> Iterator[dict]:
    """Every record of one MDS shard, through streaming's own shard reader (no StreamingDataset,
    so independent processes share nothing). Remote or compressed shards go through ``scratch``."""
    from streaming.base.compression import decompress
    from streaming.base.format import reader_from_json

    from data_pipeline.readers import record_from_mds
    obj = shard["mds"]
    raw_name, zip_info = obj["raw_data"]["basename"], obj.get("zip_data")
    dirname = src
    if is_remote(src) or not os.path.isfile(os.path.join(src, raw_name)):
        name = zip_info["basename"] if zip_info else raw_name
        url = f"{src}/{name}"
        data = s3_filesystem().cat_file(url) if is_remote(src) else Path(url).read_bytes()
        if zip_info:
            data = decompress(obj["compression"], data)
        dirname = scratch
        Path(scratch, raw_name).parent.mkdir(parents=True, exist_ok=True)
        Path(scratch, raw_name).write_bytes(data)
    reader = reader_from_json(dirname, None, obj)
    for i in range(reader.samples):
        yield record_from_mds(reader.get_item(i))


class _ShardReader:
    def __init__(self, src: str, fmt: str, cache_dir: str | None):
        self.src, self.fmt, self.cache_dir = src, fmt, cache_dir
        self._wds = None
        if fmt == "wds":
            from data_pipeline.readers import WDSShardDataset
            self._wds = WDSShardDataset(src, 1, rank=0, world_size=1, shuffle=False, seed=0, cache_dir=cache_dir,
                                        on_error="raise", drop_last=False, resolution=None)

    def records(self, i: int, shard: dict) -> Iterator[dict]:
        if self._wds is not None:
            from data_pipeline.readers import BadDataError
            for _, rec in self._wds._shard_records(i):
                if isinstance(rec, str):  # a sample that cannot be read: name it, never skip it silently
                    raise BadDataError(rec)
                yield rec
            return
        with tempfile.TemporaryDirectory(prefix="crossflow-mds-shard-") as scratch:
            yield from _mds_shard_records(self.src, shard, scratch)


# ---------------------------------------------------------------------------------------------
# the plan: input shards + settings + the measured latent scale


def measure_latent_scale(records: Iterator[dict], vae: str, device, n: int, resolution: int | None,
                         batch_size: int) -> dict:
    """First pass: the unscaled posterior means of the first ``n`` images -> their std and mean."""
    from data_pipeline.features import LatentStats, load_image_encoder
    from data_pipeline.sources import decode_rgb
    encoder = load_image_encoder(vae, device, batch_size)
    stats = LatentStats()
    taken = 0
    for batch in _batched(records, batch_size):
        batch = batch[: n - taken]
        stats.add(encoder.posterior_mean(np.stack([decode_rgb(r["image"], resolution) for r in batch])))
        taken += len(batch)
        if taken >= n:
            break
    del encoder
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the --num-procs parent keeps no autoencoder memory on GPU 0
    if not taken or not stats.std:
        raise ValueError("cannot measure the latent scale: no image, or latents with zero variance")
    return {"std": stats.std, "mean": stats.mean, "samples": taken}


def _first_records(reader: _ShardReader, shards: list[dict]) -> Iterator[dict]:
    for i, shard in enumerate(shards):
        yield from reader.records(i, shard)


def _check_same_run(plan: dict, new: dict, out: str) -> None:
    for key in ("input", "input_format", "format"):
        if plan[key] != new[key]:
            raise ValueError(f"{out} holds an unfinished features run with {key}={plan[key]!r}; this command gives "
                             f"{key}={new[key]!r}: run the same command to resume, or give a new --out")
    for key, old in plan["settings"].items():
        if new["settings"].get(key) != old:
            raise ValueError(f"{out} holds an unfinished features run made with {key}={old!r}; this command gives "
                             f"{key}={new['settings'].get(key)!r}: run the same command to resume, or give a new --out")
    if [(s["name"], s["samples"]) for s in plan["shards"]] != [(s["name"], s["samples"]) for s in new["shards"]]:
        raise ValueError(f"the input shards of {new['input']} changed since the unfinished run in {out} started: "
                         f"give a new --out")


def open_plan(src: str, store: _Store, settings: FeatureSettings, cache_dir: str | None, device) -> dict:
    """A new run's plan (written to the output), or the unfinished run's (checked against this one)."""
    in_fmt = detect_format(src)
    shards = input_shards(src, in_fmt)
    new = {"input": src, "input_format": in_fmt, "format": settings.format or in_fmt, "shards": shards,
           "settings": dataclasses.asdict(settings)}
    if new["format"] == "wds" and settings.compression:
        raise ValueError("WebDataset shards are written as plain tars: --compression is for --format mds only")
    if store.exists(PLAN_FILE):
        plan = store.read_json(PLAN_FILE)
        _check_same_run(plan, new, store.root)
        return plan
    if not store.is_empty():
        raise FileExistsError(f"output {store.root} is not empty and holds no unfinished features run "
                              f"({PLAN_FILE} is missing): give a new or empty folder")
    new["measured_scale"] = None
    if settings.vae and settings.scaling_factor == "auto":
        reader = _ShardReader(src, in_fmt, cache_dir)
        new["measured_scale"] = measure_latent_scale(_first_records(reader, shards), settings.vae, device,
                                                     settings.scale_samples, settings.latent_resolution,
                                                     settings.batch_size)
    store.write_json(PLAN_FILE, new)
    return new


def _wait_for_plan(store: _Store, rank: int) -> dict:
    deadline = time.monotonic() + PLAN_WAIT_S
    while not store.exists(PLAN_FILE):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: rank 0 wrote no {store.path(PLAN_FILE)} in {PLAN_WAIT_S:.0f} s")
        time.sleep(1.0)
    return store.read_json(PLAN_FILE)


def _wait_for_other_ranks(plan: dict, store: _Store) -> None:
    """Rank 0 under torchrun: wait for the parts of the other ranks (torchrun stops every rank when
    one fails, so this ends)."""
    announced = False
    while left := pending_parts(plan, store):
        if not announced:
            print(f"rank 0: waiting for {len(left)} input shards of the other ranks", file=sys.stderr)
            announced = True
        time.sleep(5.0)


def _scaling_of(plan: dict) -> float | None:
    s = plan["settings"]["scaling_factor"]
    if s == "auto":
        return 1.0 / plan["measured_scale"]["std"]
    return s


# ---------------------------------------------------------------------------------------------
# one rank's work


def build_featurizer(plan: dict, device):
    from data_pipeline.convert import Featurizer
    from data_pipeline.features import load_image_encoder, load_text_encoder
    s = plan["settings"]
    text = image = None
    if s["text_encoder"]:
        text = load_text_encoder(s["text_encoder"], device, hidden_layer=s["text_hidden_layer"],
                                 multiplier=s["text_multiplier"])
    if s["vae"]:
        image = load_image_encoder(s["vae"], device, s["batch_size"], _scaling_of(plan), s["shift_factor"])
    return Featurizer(text, s["max_tokens"], image, s["latent_resolution"])


class Stopped(Exception):
    """``keep_going()`` turned false mid-part: the part is left unmarked, for a later run to redo."""


def featurize_part(plan: dict, i: int, reader: _ShardReader, featurizer, store: _Store,
                   on_batch: Callable[[int], None], keep_going: Callable[[], bool] = lambda: True) -> None:
    """Input shard ``i`` -> ``part-<i>`` + its completion marker (written last)."""
    from data_pipeline.features import LatentStats
    s, part = plan["settings"], part_name(i)
    store.remove(part)  # what a killed attempt left of this part
    featurizer.latent_stats = LatentStats()
    writer = open_writer(plan["format"], store.path(part), s["shard_bytes"], s["compression"])
    for batch in _batched(reader.records(i, plan["shards"][i]), s["batch_size"]):
        if not keep_going():
            raise Stopped(part)
        for rec in featurizer(batch):
            writer.write(rec)
        on_batch(len(batch))
    written = writer.close()
    meta = featurizer.metadata()
    store.write_json(_done_file(i), {"samples": written.samples, "shards": written.shards, "bytes": written.bytes,
                                     "latent_stats": featurizer.latent_stats.to_dict(), **meta.to_dict()})


def pending_parts(plan: dict, store: _Store, rank: int = 0, world: int = 1) -> list[int]:
    """Input shards of this rank without a completion marker."""
    done = store.names(DONE_DIR)
    return [i for i in range(rank, len(plan["shards"]), world) if f"{part_name(i)}.json" not in done]


def run_rank(plan: dict, store: _Store, rank: int, world: int, device, cache_dir: str | None,
             on_batch: Callable[[int], None], keep_going: Callable[[], bool] = lambda: True) -> None:
    todo = pending_parts(plan, store, rank, world)
    if not todo:
        return
    featurizer = build_featurizer(plan, device)
    reader = _ShardReader(plan["input"], plan["input_format"], cache_dir)
    try:
        for i in todo:
            featurize_part(plan, i, reader, featurizer, store, on_batch, keep_going)
    except Stopped:
        return


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when its parent dies, so a killed ``--num-procs``
    run leaves no worker writing a part that the resumed run redoes."""
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # elsewhere: keep_going() below still stops the worker between batches


def _child_main(plan: dict, root: str, rank: int, world: int, device, cache_dir, queue, parent_pid: int) -> None:
    """One ``--num-procs`` worker. Ends with its parent (killed or not)."""
    _die_with_parent()
    if os.getppid() != parent_pid:
        return
    import torch
    if device is None or str(device) == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    run_rank(plan, _Store(root), rank, world, device, cache_dir, on_batch=queue.put,
             keep_going=lambda: os.getppid() == parent_pid)


def _device_for(rank: int, device):
    """``device`` as given (``cpu``, ``cuda:3``); ``cuda`` or None with GPUs present: one GPU per rank."""
    import torch
    if device not in (None, "cuda"):
        return device
    if torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device or "cpu"


def _run_children(plan: dict, store: _Store, num_procs: int, device, cache_dir, bar) -> None:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_child_main, name=f"features-rank-{r}",
                         args=(plan, store.root, r, num_procs, _device_for(r, device), cache_dir, queue, os.getpid()))
             for r in range(num_procs)]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs) or not queue.empty():
            try:
                n = queue.get(timeout=0.2)
            except Empty:
                continue
            if bar is not None:
                bar.update(n)
    finally:
        for p in procs:
            p.join()
    failed = [(p.name, p.exitcode) for p in procs if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"features workers failed: {failed} (their errors are above); completed input shards "
                           f"are kept: run the same command again to resume")


# ---------------------------------------------------------------------------------------------
# merging the parts


def _merge_mds_index(store: _Store, parts: list[str]) -> None:
    import logging

    from streaming.base.util import merge_index
    store.remove(MDS_INDEX)
    logging.disable(logging.WARNING)  # merge_index logs its temporary folder as a warning
    try:
        merge_index([store.path(f"{p}/{MDS_INDEX}") for p in parts], store.root, keep_local=not store.remote)
    finally:
        logging.disable(logging.NOTSET)


def _merge_wds_index(store: _Store, parts: list[str]) -> None:
    shards, features = [], None
    for p in parts:
        index = store.read_json(f"{p}/{WDS_INDEX}")
        shards += [dict(s, url=f"{p}/{s['url']}") for s in index["shardlist"]]
        features = index.get("crossflow_features", features)
    store.write_json(WDS_INDEX, {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "crossflow",
                                 "shardlist": shards, "crossflow_features": features or []})


def merge_parts(plan: dict, store: _Store) -> tuple[FeatureMetadata, dict]:
    """Metadata (the input's, with the parts' computed specs and merged latent stats) and the
    merged index; the index goes last, so its presence means a complete dataset."""
    from data_pipeline.features import LatentStats
    n = len(plan["shards"])
    markers = store.read_jsons([_done_file(i) for i in range(n)])
    meta = read_feature_metadata(plan["input"])
    stats = LatentStats()
    for m in markers:
        stats.merge(LatentStats(**m["latent_stats"]))
    if plan["settings"]["vae"]:
        latent = dict(markers[0]["latent"], std=stats.std, mean=stats.mean)
        meta.latent = LatentSpec(**latent)
    if plan["settings"]["text_encoder"]:
        meta.text = TextSpec(**markers[0]["text"])
    write_feature_metadata(store.root, meta)
    parts = [part_name(i) for i in range(n)]
    (_merge_mds_index if plan["format"] == "mds" else _merge_wds_index)(store, parts)
    totals = {k: sum(m[k] for m in markers) for k in ("samples", "shards", "bytes")}
    return meta, totals


# ---------------------------------------------------------------------------------------------
# entry point


def torchrun_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _progress_bar(total: int, desc: str, position: int = 0):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=" samples", file=sys.stderr, disable=None, dynamic_ncols=True,
                position=position, smoothing=0.1)


def run_features(src: str, out: str, settings: FeatureSettings, *, num_procs: int = 1, device=None,
                 cache_dir: str | None = None, progress: bool = True) -> FeaturesSummary | None:
    """Featurize every input shard of ``src`` into ``out`` (see the module docstring). Returns the
    summary once the merged index is written; None on torchrun ranks other than 0 (rank 0 merges)."""
    start = time.monotonic()
    src = str(src).rstrip("/")
    if is_remote(src):
        sync_endpoint_env()
        check_bucket(src)
    store = _Store(out)
    rank, world = torchrun_rank()
    if num_procs < 1:
        raise ValueError(f"--num-procs must be >= 1, got {num_procs}")
    if world > 1 and num_procs > 1:
        raise ValueError(f"--num-procs {num_procs} under torchrun (WORLD_SIZE={world}): use one or the other")
    if rank == 0:
        plan = open_plan(src, store, settings, cache_dir, _device_for(0, device))
    else:
        plan = _wait_for_plan(store, rank)
        _check_same_run(plan, {"input": src, "input_format": plan["input_format"],
                               "format": settings.format or plan["input_format"], "shards": plan["shards"],
                               "settings": dataclasses.asdict(settings)}, store.root)
    n = len(plan["shards"])
    pending = pending_parts(plan, store)
    resumed, processed = n - len(pending), sum(plan["shards"][i]["samples"] for i in pending)
    mine = pending_parts(plan, store, 0 if num_procs > 1 else rank, 1 if num_procs > 1 else world)
    total = sum(plan["shards"][i]["samples"] for i in mine)
    bar = _progress_bar(total, "features" if world == 1 else f"features rank {rank}", rank) if progress else None
    try:
        if num_procs > 1:
            _run_children(plan, store, num_procs, device, cache_dir, bar)
        else:
            run_rank(plan, store, rank, world, _device_for(int(os.environ.get("LOCAL_RANK", rank)), device),
                     cache_dir, on_batch=bar.update if bar is not None else (lambda k: None))
    finally:
        if bar is not None:
            bar.close()
    if rank != 0:
        return None  # rank 0 merges once every rank's parts are done
    _wait_for_other_ranks(plan, store)
    meta, totals = merge_parts(plan, store)
    return FeaturesSummary(totals["samples"], totals["shards"], totals["bytes"], n, resumed, processed,
                           time.monotonic() - start, meta)
