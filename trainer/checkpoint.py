"""Checkpoints: written atomically, found through a ``latest`` pointer, pruned to the last k.

Layout under ``<out_dir>/checkpoints/``:
    step_00000500/        one checkpoint (directory)
        state.pt          engine state (model, optimizer, scheduler, EMA)
        trainer.pt        step, data position, RNG states
        weights.pt        weights for sampling (EMA when kept) + model args: all ``crossflow sample`` needs
        config.yaml       the resolved config
    latest                text file naming the newest complete checkpoint

A save writes into a hidden temporary directory, fsyncs, renames it into place (atomic on
POSIX), and only then moves ``latest``; a save killed midway leaves the previous one intact.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import torch
import yaml

STEP_DIR = re.compile(r"^step_(\d{8})$")
WEIGHTS_FILE = "weights.pt"


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


def save_checkpoint(out_dir: str | Path, step: int, files: dict[str, object], config: dict,
                    keep_last: int) -> Path:
    """Write ``files`` (name -> object for torch.save) and the config as checkpoint ``step``."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, obj in files.items():
        _write_file(tmp / name, lambda f, obj=obj: torch.save(obj, f))
    _write_file(tmp / "config.yaml", lambda f: f.write(yaml.safe_dump(config, sort_keys=False).encode()))
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
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    for ckpt in list_checkpoints(out_dir)[:-keep_last]:
        if ckpt != latest:
            shutil.rmtree(ckpt, ignore_errors=True)


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


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(f"no checkpoint at {path}: expected a checkpoint directory holding "
                              f"{WEIGHTS_FILE} or a run directory with checkpoints/latest")
    return latest


def load_file(ckpt: Path, name: str, map_location="cpu"):
    path = Path(ckpt) / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
    return torch.load(path, map_location=map_location, weights_only=False)


def weights_payload(model_state: dict, model_args) -> dict:
    return {"state_dict": model_state, "model_args": dataclasses.asdict(model_args)}
