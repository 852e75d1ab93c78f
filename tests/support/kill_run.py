"""Kill a real ``crossflow data features`` run mid-way, from outside (no hook in production code).

``run_and_kill(argv, done_dir, after)`` starts ``python -m cluster.cli <argv>`` in its own process
group, waits until ``after`` input shards are marked done in ``done_dir``, then SIGKILLs the whole
group (the parent and its ``--num-procs`` workers: what a scheduler's kill or a lost node does).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def run_and_kill(argv: list[str], done_dir: str | Path, after: int, timeout: float = 300.0) -> int:
    """Returns how many input shards were marked done when the kill landed."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", *argv], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done_dir = Path(done_dir)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done = len(list(done_dir.glob("*.json"))) if done_dir.is_dir() else 0
            if done >= after:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return done
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (code {proc.returncode}) before {after} shards were done:\n"
                                     f"{proc.stdout.read().decode(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {after} shards done within {timeout} s")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
