"""`crossflow submit` / `crossflow jobs` against a real Ray head started on loopback by the test."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from cluster.jobs import TERMINAL, build_entrypoint
from cluster.ray_train import PID_DIR
from tests.cluster.conftest import REPO, cli, ray_tiny_overrides, run
from trainer.checkpoint import latest_checkpoint
from trainer.config import ConfigError

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(marker: str) -> list[psutil.Process]:
    """Processes of the head this test started: every one inherits its marker variable."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("CROSSFLOW_TEST_HEAD") == marker:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with token auth off; stopped (only its own processes) afterwards."""
    port, dash = free_port(), free_port()
    marker = uuid.uuid4().hex
    env = {**os.environ, "CROSSFLOW_TEST_HEAD": marker, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                          "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
                          "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}"
    finally:
        procs = marked_processes(marker)
        for p in procs:
            p.terminate()
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            p.kill()
        current = Path("/tmp/ray/ray_current_cluster")  # what `ray stop` would remove: ours only
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_entrypoint_needs_the_config_inside_the_working_dir(tmp_path):
    cmd = build_entrypoint(str(REPO / "configs/demo.yaml"), ["train.steps=3", "log.wandb_name=a b"], REPO)
    assert cmd == "python -m trainer.cli train --config configs/demo.yaml train.steps=3 'log.wandb_name=a b'"
    (tmp_path / "c.yaml").write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="outside the working directory"):
        build_entrypoint(str(tmp_path / "c.yaml"), [], REPO)


def submit(ray_head: str, run_dir: Path, **extra) -> str:
    out = run(cli("submit", "--address", ray_head, "--python", sys.executable, "--config", "configs/demo.yaml",
                  *ray_tiny_overrides(run_dir, **extra)), timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return re.search(r"submitted (\S+) to", out.stdout).group(1)


def wait_terminal(ray_head: str, job_id: str, timeout: float = 300) -> str:
    deadline, status = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        status = run(cli("jobs", "status", job_id, "--address", ray_head), timeout=60).stdout.strip()
        if status in TERMINAL:
            break
        time.sleep(2)
    return status


def test_submit_follow_and_stop_on_a_real_head(ray_head, tmp_path):
    """A tiny run submitted as a Ray Job succeeds (status, logs, its files); a long one is stopped
    with `jobs stop`: a final checkpoint at a logging step, and no worker left behind."""
    run_dir = tmp_path / "run"
    job_id = submit(ray_head, run_dir)
    status = wait_terminal(ray_head, job_id)
    logs = run(cli("jobs", "logs", job_id, "--address", ray_head), timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "trained 4 steps" in logs
    assert (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "ray" / "run" / "step_00000004" / "trainer.pt").is_file()
    stop = run(cli("jobs", "stop", job_id, "--address", ray_head), timeout=60)
    assert stop.returncode == 0 and "not running" in stop.stdout

    long_dir = tmp_path / "long"
    job_id = submit(ray_head, long_dir, **{"train.steps": 100000})
    deadline = time.monotonic() + 240
    while not ((long_dir / "metrics.jsonl").is_file() and "loss" in (long_dir / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline, "no logged step within 240 s"
        time.sleep(1)
    pids = [int((long_dir / PID_DIR / f"rank{r}.pid").read_text()) for r in (0, 1)]
    stop = run(cli("jobs", "stop", job_id, "--address", ray_head), timeout=60)
    assert stop.returncode == 0 and "stop requested" in stop.stdout
    status = wait_terminal(ray_head, job_id, timeout=180)
    logs = run(cli("jobs", "logs", job_id, "--address", ray_head), timeout=60).stdout
    assert status == "STOPPED", logs[-4000:]
    stopped = int(re.search(r"stopped at step (\d+)", logs).group(1))
    assert 0 < stopped < 100000 and stopped % 2 == 0  # a logging step (log_every=2)
    assert latest_checkpoint(long_dir).name == f"step_{stopped:08d}"
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
