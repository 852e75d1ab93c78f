"""Ray Jobs: submit ``crossflow train`` to a running cluster, and status / logs / stop.

The job's runtime_env ships the code and its environment as ``cluster.runtime_env`` says
(``cluster/runtime_env.py``: the working directory, with pip requirements, or a container image),
and the entrypoint runs ``python -m cluster.cli train --config <config> <overrides>`` from that
shipped code on the head node, which then starts the Ray Train workers on the cluster
(``cluster.*``); they inherit the job's runtime_env. ``jobs stop`` sends SIGTERM to that driver:
the workers stop at the next logging step with a final checkpoint, within
``cluster.stop_timeout_s`` (the job's RAY_JOB_STOP_WAIT_TIME_S, after which Ray kills it).
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from cluster.runtime_env import build_runtime_env, job_entrypoint, job_env_vars
from trainer.config import ClusterConfig, ConfigError, load_config

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str):
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(address)


def config_in_working_dir(config: str, working_dir: Path) -> Path:
    """The config's path relative to the working directory (only files inside it reach the cluster)."""
    try:
        return Path(config).resolve().relative_to(working_dir.resolve())
    except ValueError:
        raise ConfigError(f"--config {config} is outside the working directory {working_dir}: "
                          f"only files inside it reach the cluster") from None


def build_entrypoint(config: str, overrides: list[str], working_dir: Path, python: str = "python",
                     cluster: ClusterConfig | None = None) -> str:
    """The job's command line; the config must lie inside the working directory (it travels with it)."""
    return job_entrypoint(cluster or ClusterConfig(), config_in_working_dir(config, working_dir), overrides,
                          working_dir, python)


def submit_job(address: str, config: str, overrides: list[str], working_dir: str | Path = ".",
               env_vars: dict | None = None, python: str = "python", submission_id: str | None = None) -> str:
    """Validate the config here (errors name the key before anything is sent), build the runtime
    environment, then submit; returns the job id."""
    cfg = load_config(config, overrides)
    working_dir = Path(working_dir)
    entrypoint = build_entrypoint(config, overrides, working_dir, python, cfg.cluster)
    env = {"PYTHONUNBUFFERED": "1", "RAY_JOB_STOP_WAIT_TIME_S": str(int(cfg.cluster.stop_timeout_s) + 30),
           **job_env_vars(cfg.cluster), **(env_vars or {})}
    runtime_env = build_runtime_env(cfg.cluster, working_dir, env)
    return client(address).submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                      submission_id=submission_id,
                                      metadata={"crossflow_config": str(config), "out_dir": cfg.train.out_dir,
                                                "runtime_env": cfg.cluster.runtime_env})


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
