"""Ray tests: token auth off for every cluster they start and every client (consistently, so no
~/.ray/auth_token is created or needed), and DeepSpeed's /dev/shm buffers removed afterwards."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[2]
SHM = Path("/dev/shm")


def ray_tiny_overrides(out_dir, **extra) -> list[str]:
    """A seconds-per-step run of the tiny preset on 2 Ray workers (ZeRO-2, CPU)."""
    values = {
        "model.preset": "tiny", "model.kernels": "torch",
        "data.text_encoder": "hashed-words-32", "data.num_samples": 512, "data.max_tokens": 12,
        "train.steps": 4, "train.global_batch_size": 8, "train.log_every": 2, "train.ckpt_every": 0,
        "train.out_dir": str(out_dir), "train.threads": 1, "train.zero_stage": 2,
        "optim.warmup_steps": 2, "optim.lr": 1e-3, "sample.steps": 2, "sample.num_prompts": 2,
        "eval.shapes": False, "log.wandb": "disabled", "log.progress": False,
        "cluster.num_workers": 2, "cluster.cpus_per_worker": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cluster.cli", *args]


def run(cmd: list[str], timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(autouse=True)
def clean_shm():
    """DeepSpeed's CPU all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_* (66 MB each)."""
    before = set(SHM.glob("deepspeed_allreduce_buffer_*"))
    yield
    for path in set(SHM.glob("deepspeed_allreduce_buffer_*")) - before:
        path.unlink(missing_ok=True)
