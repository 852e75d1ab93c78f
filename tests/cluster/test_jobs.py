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
from tests.cluster.conftest import REPO, cli, ray_tiny_overrides, run
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


def test_submit_tiny_run_to_a_real_head(ray_head, tmp_path):
    run_dir = tmp_path / "run"
    out = run(cli("submit", "--address", ray_head, "--python", sys.executable, "--config", "configs/demo.yaml",
                  *ray_tiny_overrides(run_dir)), timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    job_id = re.search(r"submitted (\S+) to", out.stdout).group(1)

    deadline, status = time.monotonic() + 300, ""
    while time.monotonic() < deadline:
        status = run(cli("jobs", "status", job_id, "--address", ray_head), timeout=60).stdout.strip()
        if status in TERMINAL:
            break
        time.sleep(2)
    logs = run(cli("jobs", "logs", job_id, "--address", ray_head), timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "trained 4 steps" in logs
    assert (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "ray" / "run" / "step_00000004" / "trainer.pt").is_file()
    stop = run(cli("jobs", "stop", job_id, "--address", ray_head), timeout=60)
    assert stop.returncode == 0 and "not running" in stop.stdout
