"""Ray Jobs: submit ``crossflow train`` to a running cluster, and status / logs / stop.

The job's runtime_env carries the working directory (the repository: code and configs; files
named in .gitignore, such as .venv and runs/, stay behind), and the entrypoint runs
``python -m trainer.cli train --config <config> <overrides>`` in it on the head node, which then
starts the Ray Train workers on the cluster (``cluster.*``). ``jobs stop`` sends SIGTERM to that
driver: the workers stop at the next logging step with a final checkpoint, within
``cluster.stop_timeout_s`` (the job's RAY_JOB_STOP_WAIT_TIME_S, after which Ray kills it).
"""
from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path

from trainer.config import ConfigError, load_config

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(address)


def build_entrypoint(config: str, overrides: list[str], working_dir: Path, python: str = "python") -> str:
    """The job's command line; the config must lie inside the working directory (it travels with it)."""
    cfg_path = Path(config).resolve()
    try:
        rel = cfg_path.relative_to(working_dir.resolve())
    except ValueError:
        raise ConfigError(f"--config {config} is outside the working directory {working_dir}: "
                          f"only files inside it reach the cluster") from None
    args = ["train", "--config", str(rel), *overrides]
    return f"{python} -m trainer.cli " + " ".join(shlex.quote(a) for a in args)


def submit_job(address: str, config: str, overrides: list[str], working_dir: str | Path = ".",
               env_vars: dict | None = None, python: str = "python", submission_id: str | None = None) -> str:
    """Validate the config here (errors name the key before anything is sent), then submit; returns the id."""
    cfg = load_config(config, overrides)
    working_dir = Path(working_dir)
    entrypoint = build_entrypoint(config, overrides, working_dir, python)
    env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(int(cfg.cluster.stop_timeout_s) + 30),
           **(env_vars or {})}
    runtime_env = {"working_dir": str(working_dir.resolve()), "env_vars": env,
                   "excludes": [".git", "runs", "wandb", ".venv", "*.egg-info"]}
    return client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                      submission_id=submission_id,
                                      metadata={"crossflow_config": str(config), "out_dir": cfg.train.out_dir})


def job_status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def job_logs(address: str, job_id: str) -> str:
    return client(address).get_job_logs(job_id)


def follow_logs(address: str, job_id: str, out=sys.stdout) -> str:
    """Print the job's log as it grows until the job ends; returns its final status."""
    c = client(address)

    async def tail():
        async for chunk in c.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
    asyncio.run(tail())
    return wait_for_job(address, job_id, timeout=60)


def wait_for_job(address: str, job_id: str, timeout: float = 600, poll: float = 1.0) -> str:
    c = client(address)
    deadline = time.monotonic() + timeout
    while True:
        status = str(c.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll)


def stop_job(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
