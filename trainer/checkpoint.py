"""Checkpoints: written atomically, found through a ``latest`` pointer, pruned to the last k.

Layout under ``<out_dir>/checkpoints/``:
    step_00000500/             one checkpoint (directory)
        mp_rank_*, *optim_states.pt   DeepSpeed's own files, from every rank (ZeRO shards)
        trainer.pt             step and data-stream position
        rng_rank{r}.pt         every rank's RNG states
        ema.pt | ema_rank{r}.pt  EMA (rank 0's copy; every rank's partition under ZeRO-3)
        weights.safetensors    consolidated fp32 EMA weights (built on rank 0 only) + model args + config
                               + feature metadata: all ``crossflow sample`` needs (the autoencoder folder included)
        model.json             the model args (the flow model's constructor arguments)
        crossflow_features.json  how the training data's latents and text features were made
        config.yaml            the resolved config
    model.json, config.yaml and crossflow_features.json say what the checkpoint was trained on without
    weights.safetensors (a restarted Ray worker resumes without fetching it: ``resume_files``).
    latest                     text file naming the newest complete checkpoint

All ranks write into a hidden temporary directory; after a barrier rank 0 fsyncs it, renames it
into place (atomic on POSIX) and only then moves ``latest``. A save killed midway leaves the
previous checkpoint and pointer intact; the next save deletes the leftover.

Training state (``save_checkpoint`` / ``load_checkpoint``, collective): the DeepSpeed engine (weights,
ZeRO optimizer shards, schedule), the EMA, the data stream's position and every rank's RNG states;
resuming from them replays the same steps, batch for batch and draw for draw.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from data_pipeline.metadata import FeatureMetadata, read_feature_metadata, write_feature_metadata

STEP_DIR = re.compile(r"^step_(\d{8})$")
WEIGHTS_FILE = "weights.safetensors"
MODEL_FILE = "model.json"  # the model args; checkpoints written before it carry them in WEIGHTS_FILE only


class CheckpointError(RuntimeError):
    pass


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_file(tmp, lambda f: f.write(text.encode()))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))


def tmp_tag(step: int) -> str:
    """Name of the temporary directory a save of ``step`` writes into (all ranks agree on it)."""
    return f".tmp-step_{step:08d}"


def prepare_checkpoint(out_dir: str | Path, step: int) -> Path:
    """Rank 0, before the ranks write: an empty temporary directory for checkpoint ``step``."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / tmp_tag(step)
    if tmp.exists():  # left by a save that was killed
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def write_torch(path: Path, obj) -> None:
    _write_file(path, lambda f: torch.save(obj, f))


def commit_checkpoint(out_dir: str | Path, step: int, config: dict, keep_last: int) -> Path:
    """Rank 0, after every rank wrote its part: fsync, rename into place, move ``latest``, prune."""
    root = checkpoint_root(out_dir)
    tmp, final = root / tmp_tag(step), root / f"step_{step:08d}"
    _write_file(tmp / "config.yaml", lambda f: f.write(yaml.safe_dump(config, sort_keys=False).encode()))
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the final save after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", final.name + "\n")
    prune_checkpoints(out_dir, keep_last)
    return final


def prune_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never the one ``latest`` names), and
    temporary directories that a killed save left behind."""
    root = checkpoint_root(out_dir)
    latest = latest_checkpoint(out_dir)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    for ckpt in list_checkpoints(out_dir)[:-keep_last]:
        if ckpt != latest:
            shutil.rmtree(ckpt, ignore_errors=True)


# ----------------------------------------------------------------------------- across nodes
# A file a rank writes for itself names the rank: DeepSpeed's ZeRO shards ([bf16_]zero_pp_rank_{r}_
# mp_rank_00_optim_states.pt; under ZeRO-3 also ..._model_states.pt) and ours (rng_rank{r}.pt,
# ema_rank{r}.pt). Every other file of a checkpoint is written by rank 0 and read by every rank.
RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_|(?:rng|ema)_rank(\d+)\.pt$")


def file_rank(name: str) -> int | None:
    """The rank a checkpoint file belongs to, or None for a shared file (rank 0 writes it, all read it)."""
    m = RANK_FILE.search(name)
    return int(m.group(1) or m.group(2)) if m else None


def written_by(names, rank: int) -> list[str]:
    """Of a checkpoint's file names, those ``rank`` writes (rank 0: also the shared ones)."""
    return sorted(n for n in names if (file_rank(n) or 0) == rank)


def resume_files(names, rank: int) -> list[str]:
    """Of a checkpoint's file names, those ``rank`` needs to resume (``load_checkpoint`` and
    ``check_same_input``): its own (ZeRO shards, RNG, EMA partition) and the shared ones (DeepSpeed's
    model states under ZeRO 1/2, the EMA copy, trainer.pt, and what ``check_same_input`` reads:
    model.json, config.yaml, crossflow_features.json). DeepSpeed opens only its own rank's
    optimizer shard (ZeRO's ``elastic_checkpoint`` is off) and, under ZeRO-3, only its own model
    shard. Not the consolidated weights (20x a rank's shard at 64 ranks), which resuming never
    reads; except in a checkpoint written before model.json, whose weights file's header is the
    only record of the model args."""
    names = set(names)
    skip = {WEIGHTS_FILE} if MODEL_FILE in names else set()
    return sorted(n for n in names - skip if file_rank(n) in (None, rank))


def prune_node_checkpoints(out_dir: str | Path, keep_last: int) -> None:
    """Every node, once every rank's part of the newest checkpoint is stored elsewhere (Ray's storage)
    and no save is under way: ``prune_checkpoints`` of this node's run directory. Without a shared
    run directory rank 0 commits and prunes only on its own node; on every other node each save
    leaves a ``.tmp-step_*`` with that node's ZeRO shards, and a node that held rank 0 before a
    restart keeps its committed checkpoints. The newest ``keep_last`` and ``latest`` stay: a
    rank's own record of its last checkpoint points at the newest. With a shared run directory
    the nodes prune one folder: nothing is left to delete but the same directories
    (``ignore_errors``), and no node's save is under way."""
    if checkpoint_root(out_dir).is_dir():
        prune_checkpoints(out_dir, keep_last)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names (falling back to the newest complete one), or None."""
    root = checkpoint_root(out_dir)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.is_dir():
            return candidate
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_weights(path: Path, state_dict: dict, model_args, config: dict, prefix: str = "",
                 features: dict | None = None) -> None:
    """A safetensors file of weights (float32, contiguous) with the model args, the config and the
    training data's feature metadata (``crossflow_features.json``: autoencoder, text encoder) as metadata."""
    from safetensors.torch import save_file
    tensors = {prefix + k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"model_args": json.dumps(dataclasses.asdict(model_args)), "config": json.dumps(config),
            "features": json.dumps(features or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _crossflow_metadata(path: str | Path) -> dict:
    """The safetensors header metadata of a crossflow weights file or export (no tensors read)."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own errors ("header too large") do not say what the file is
        raise CheckpointError(f"{path} is not a safetensors file ({e}): give a checkpoint directory "
                              f"(checkpoints/step_N), a run directory (its latest checkpoint) or a "
                              f"`crossflow export` file") from e
    if "model_args" not in meta:
        raise CheckpointError(f"{path} has no crossflow model_args metadata: not a crossflow export")
    return meta


def load_weights(path: str | Path, ema: bool = True) -> tuple[dict, dict, dict]:
    """(state_dict, model_args, config) of a weights file; an export's ``ema.`` weights win when present,
    its live ``model.`` weights with ``ema=False`` (a checkpoint's weights file holds the EMA only: refused)."""
    from safetensors import safe_open
    meta = _crossflow_metadata(path)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        if not ema and not keys[0].startswith(("model.", "ema.")):
            raise CheckpointError(f"{path} holds only the EMA weights; the live weights are in an export "
                                  f"(`crossflow export --checkpoint ... --out FILE.safetensors`)")
        has_ema = ema and any(k.startswith("ema.") for k in keys)
        prefix = "ema." if has_ema else ("model." if any(k.startswith("model.") for k in keys) else "")
        state = {k[len(prefix):]: f.get_tensor(k) for k in keys if k.startswith(prefix)}
    return state, json.loads(meta["model_args"]), json.loads(meta["config"])


def read_weights_metadata(path: str | Path) -> tuple[dict, dict, "FeatureMetadata"]:
    """(model_args, config, feature metadata) of a weights file or export, without reading its
    tensors; the feature metadata is empty for files written before it existed."""
    meta = _crossflow_metadata(path)
    features = FeatureMetadata.from_dict(json.loads(meta.get("features") or "{}"))
    return json.loads(meta["model_args"]), json.loads(meta["config"]), features


def read_checkpoint_metadata(path: str | Path) -> tuple[dict, dict, "FeatureMetadata"]:
    """(model_args, config, feature metadata) of an export, a checkpoint directory or a run directory
    (its latest), no tensors read: from a checkpoint's small files (model.json, config.yaml,
    crossflow_features.json), else from the weights file's header (an export, or a checkpoint
    written before model.json). ``trainer.model_input.saved_model_input`` reads it."""
    path = Path(path)
    if path.is_file():
        return read_weights_metadata(path)
    ckpt = resolve_checkpoint_dir(path)
    if not (ckpt / MODEL_FILE).is_file():
        return read_weights_metadata(ckpt / WEIGHTS_FILE)
    config = ckpt / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: config.yaml is missing")
    return (json.loads((ckpt / MODEL_FILE).read_text()), yaml.safe_load(config.read_text()),
            read_feature_metadata(str(ckpt)))


def load_features(path: str | Path):
    """The feature metadata (``data_pipeline.metadata.FeatureMetadata``) a weights file or export carries."""
    return read_weights_metadata(path)[2]


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """``none`` -> None; ``auto`` -> the latest checkpoint in out_dir (None if there is none);
    otherwise a checkpoint directory that must exist."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if not (path / "trainer.pt").is_file():
        raise CheckpointError(f"train.resume={resume!r} is not a checkpoint directory (no trainer.pt inside)")
    return path


def resolve_weights(path: str | Path) -> Path:
    """A weights file: an export (.safetensors), a checkpoint directory, or a run directory's latest."""
    path = Path(path)
    if path.is_file():
        return path
    return resolve_checkpoint_dir(path) / WEIGHTS_FILE


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file() or (path / MODEL_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint at {path}: expected a checkpoint directory holding "
                              f"{WEIGHTS_FILE} or {MODEL_FILE}, or a run directory with checkpoints/latest")
    return latest


def load_file(ckpt: Path, name: str, map_location="cpu"):
    path = Path(ckpt) / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    return torch.load(path, map_location=map_location, weights_only=False)




# ----------------------------------------------------------------------------- training state
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(engine, stream, cfg, step: int, rank: int, features: FeatureMetadata | None = None) -> Path:
    """Collective: every rank writes its part of checkpoint ``step`` (``engine``: a
    ``trainer.engine.Engine``; ``stream``: the data stream, its ``state_dict`` is the position) into a
    temporary directory; rank 0 commits it. ``features``: how the training data's latents and text
    features were made (sampling finds the autoencoder in it)."""
    out_dir = Path(cfg.train.out_dir)
    if rank == 0:
        prepare_checkpoint(out_dir, step)
    barrier()
    tmp = checkpoint_root(out_dir) / tmp_tag(step)
    engine.save(str(checkpoint_root(out_dir)), tmp_tag(step))  # DeepSpeed: model + ZeRO optimizer shards
    write_torch(tmp / f"rng_rank{rank}.pt", rng_state())
    ema = engine.ema_state_for_rank()
    if ema is not None:
        write_torch(tmp / (f"ema_rank{rank}.pt" if engine.zero_stage == 3 else "ema.pt"), ema)
    weights = engine.ema_full_state_dict(keep=rank == 0)  # collective under ZeRO-3; None on other ranks
    if rank == 0:
        write_torch(tmp / "trainer.pt", {"step": step, "data": stream.state_dict()})
        features = features or FeatureMetadata()
        save_weights(tmp / WEIGHTS_FILE, weights, engine.module.args, cfg.to_dict(), features=features.to_dict())
        write_feature_metadata(tmp, features)
        _write_file(tmp / MODEL_FILE, lambda f: f.write(json.dumps(dataclasses.asdict(engine.module.args)).encode()))
    barrier()
    final = checkpoint_root(out_dir) / f"step_{step:08d}"
    if rank == 0:
        final = commit_checkpoint(out_dir, step, cfg.to_dict(), cfg.train.keep_last)
    barrier()
    return final


def load_checkpoint(engine, stream, ckpt: Path, rank: int) -> int:
    """Restore engine, EMA, data position and this rank's RNG from ``ckpt``; returns its step."""
    engine.load(str(ckpt.parent), ckpt.name)
    state = load_file(ckpt, "trainer.pt")
    stream.load_state_dict(state["data"])
    set_rng_state(load_file(ckpt, f"rng_rank{rank}.pt"))
    if engine.ema is not None:
        name = f"ema_rank{rank}.pt" if engine.zero_stage == 3 else "ema.pt"
        engine.ema.load_state_dict(load_file(ckpt, name, map_location=engine.device))
    return int(state["step"])


def check_same_input(ckpt: Path, current) -> None:
    """A checkpoint trained on other latents (or pixels) than this run's data (``current``: a
    ``trainer.model_input.ModelInput``) is refused, naming both. Reads the small files
    (``read_checkpoint_metadata``), not the weights, which a resuming rank may not have."""
    from trainer.model_input import check_same_latents, saved_model_input
    ckpt = Path(ckpt)
    if not (ckpt / MODEL_FILE).is_file() and not (ckpt / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {MODEL_FILE} is missing (and {WEIGHTS_FILE}, "
                              f"whose header holds the model args in checkpoints written before it)")
    check_same_latents(saved_model_input(ckpt), current, str(ckpt))


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint directory holds: from its ``step_N`` name, else from its trainer.pt."""
    m = STEP_DIR.match(ckpt.name)
    return int(m.group(1)) if m else int(load_file(ckpt, "trainer.pt")["step"])


def agree_on_resume(candidates: list[Path], rank: int) -> Path | None:
    """Collective: of the candidate checkpoints, the newest one that every rank can read (its
    trainer.pt and this rank's RNG file present); this rank's path to it, or None when the ranks
    share none. Candidates may differ per rank (a node-local copy, Ray's downloaded one)."""
    mine: dict[int, Path] = {}
    for ckpt in candidates:
        if (ckpt / "trainer.pt").is_file() and (ckpt / f"rng_rank{rank}.pt").is_file():
            mine.setdefault(checkpoint_step(ckpt), ckpt)  # earlier candidates win a tie
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, sorted(mine))
    common = set.intersection(*(set(v) for v in views))
    return mine[max(common)] if common else None
