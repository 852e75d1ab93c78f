"""A sweep file and its points: what ``crossflow sweep`` runs, without Ray (``cluster/sweep.py`` runs it).

A sweep file (``configs/sweeps/*.yaml``)::

    name: tiny_sizes                  # also the W&B group of every run
    base_config: configs/demo.yaml    # the training config every run starts from
    out_dir: runs/sweeps/tiny_sizes   # one run directory per point below it
    overrides: [train.steps=200]      # applied to every run
    grid:                             # the cartesian product of these values
      model.hidden_size: [64, 128, 192]
    resources: {cpus: 1, gpus: 0}     # per run
    max_concurrent: 2                 # at most this many runs at once (the cluster may allow fewer)

``expand(spec)`` gives one ``SweepPoint`` per run, each config validated before anything starts.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from trainer.config import Config, ConfigError, load_config


@dataclass
class SweepSpec:
    name: str
    base_config: str
    out_dir: str
    grid: dict[str, list]
    overrides: list[str] = field(default_factory=list)
    resources: dict = field(default_factory=lambda: {"cpus": 1, "gpus": 0})
    max_concurrent: int = 0  # 0 = as many as the cluster fits
    trial_retries: int = 0  # Tune runs a failed point again (resuming its checkpoint) this many times


@dataclass
class SweepPoint:
    """One run of the sweep: its name (also its run directory's), the overrides that make its
    config from ``base_config``, and that config, validated."""
    name: str
    overrides: list[str]
    cfg: Config

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


def load_sweep(path: str | Path) -> SweepSpec:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    known = set(SweepSpec.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; valid: {sorted(known)}")
    missing = {"name", "base_config", "out_dir", "grid"} - set(raw)
    if missing:
        raise ConfigError(f"{path}: missing sweep keys {sorted(missing)}")
    if not isinstance(raw["grid"], dict) or not raw["grid"] or \
            not all(isinstance(v, list) and v for v in raw["grid"].values()):
        raise ConfigError(f"{path}: grid must map config keys to non-empty lists of values")
    return SweepSpec(**raw)


def _slug(key: str, value) -> str:
    return f"{key.split('.')[-1]}-{value}".replace("/", "_").replace(" ", "")


def expand(spec: SweepSpec) -> list[SweepPoint]:
    """Every point of the grid; every run's config is validated here, before anything starts."""
    keys = list(spec.grid)
    points = []
    for values in itertools.product(*(spec.grid[k] for k in keys)):
        name = "_".join(_slug(k, v) for k, v in zip(keys, values))
        out_dir = Path(spec.out_dir) / name
        overrides = [*spec.overrides, *(f"{k}={v}" for k, v in zip(keys, values)),
                     f"train.out_dir={out_dir}", f"log.wandb_group={spec.name}", f"log.wandb_name={name}",
                     "train.resume=auto", "log.progress=false"]
        points.append(SweepPoint(name, overrides, load_config(spec.base_config, overrides)))  # fails naming the key
    return points
