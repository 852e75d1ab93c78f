"""`crossflow submit` / `crossflow jobs`: the runtime environment built from a config (unit), and
jobs against a real Ray head started on loopback by the test."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import zipfile
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from cluster.jobs import build_entrypoint, wait_for_job
from cluster.ray_train import PID_DIR
from cluster.runtime_env import DEFAULT_EXCLUDES, build_runtime_env, job_env_vars, shipped_files
from data_pipeline.s3 import CHECKSUM_ENV
from tests.cluster.conftest import REPO, cli, ray_tiny_overrides, run
from trainer.checkpoint import latest_checkpoint
from trainer.config import ConfigError, load_config
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def marked_processes(marker: str) -> list[psutil.Process]:
    """Processes of the head this test started: every one inherits its marker variable. Read from
    /proc/<pid>/environ as bytes: Ray's agents set their process title over the start of their
    environment block, and psutil's ``environ()`` then reads it as empty (they were left running)."""
    needle = f"CROSSFLOW_TEST_HEAD={marker}".encode()
    found = []
    for p in psutil.process_iter():
        try:
            if needle in Path(f"/proc/{p.pid}/environ").read_bytes():
                found.append(p)
        except (OSError, psutil.Error):
            pass
    return found


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with token auth off, 4 logical CPUs (two 2-worker jobs at once)
    and its own port for the dashboard agent, which runs the jobs (Ray's default, 52365, may be
    another cluster's on this machine: then no agent takes jobs); afterwards its own processes are
    killed by pid (SIGTERM leaves gcs_server and raylet running for 15 s or more, and there is
    nothing of the head's to save)."""
    port, dash = free_port(), free_port()
    marker = uuid.uuid4().hex
    env = {**os.environ, "CROSSFLOW_TEST_HEAD": marker, "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run([RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
                          "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "4",
                          "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        yield f"http://127.0.0.1:{dash}"
    finally:
        procs = marked_processes(marker)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        current = Path("/tmp/ray/ray_current_cluster")  # what `ray stop` would remove: ours only
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_entrypoint_needs_the_config_inside_the_working_dir(tmp_path):
    cmd = build_entrypoint(str(REPO / "configs/demo.yaml"), ["train.steps=3", "log.wandb_name=a b"], REPO)
    assert cmd == "python -m cluster.cli train --config configs/demo.yaml train.steps=3 'log.wandb_name=a b'"
    (tmp_path / "c.yaml").write_text("train: {steps: 3}\n")
    with pytest.raises(ConfigError, match="outside the working directory"):
        build_entrypoint(str(tmp_path / "c.yaml"), [], REPO)


SETUP_CFG = """[options]
install_requires =
    torch>=2.4  # a comment
    numpy>=1.24,<2.2
    ray[default,train]>=2.40

    s3fs>=2025.1
"""


def _project(root: Path) -> Path:
    """A working dir with what must travel (code, configs, setup.cfg) and what must not."""
    files = {"setup.cfg": SETUP_CFG, "trainer/cli.py": "print('hi')\n", "configs/a.yaml": "train: {steps: 3}\n",
             ".gitignore": "secret_notes.txt\n", "secret_notes.txt": "x", ".git/HEAD": "ref",
             ".venv/lib/x.py": "", "runs/r/metrics.jsonl": "{}", "wandb/offline-run/x": "",
             "trainer/__pycache__/cli.cpython-311.pyc": "", "data/mds/index.json": "{}",
             "data/mds/shard.00000.mds": "m", "imgs/00000.tar": "t", "reqs/gpu.txt": "torch>=2.4\n# note\nray>=2\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "weights.bin").write_bytes(b"\0" * (2 << 20))  # 2 MiB: over max_file_mb=1
    return root


def _ray_zip_names(working_dir: Path, excludes: list[str], tmp: Path) -> set[str]:
    """The files Ray's own packer puts in the working_dir package for these excludes."""
    from ray._private.runtime_env.packaging import create_package
    create_package(str(working_dir), tmp / "pkg.zip", include_gitignore=True, excludes=excludes)
    return {n for n in zipfile.ZipFile(tmp / "pkg.zip").namelist() if not n.endswith("/")}


def test_runtime_env_from_config(tmp_path, monkeypatch, capsys):
    """working_dir: Ray's own packer ships the code and configs only; pip: the list derived from
    setup.cfg or a requirements file (its installation needs a network, so only the list is checked,
    and that Ray accepts the runtime_env); image: Ray's image_uri, the job run from the image's copy;
    env vars: endpoint, checksum policy and W&B mode travel, a credential only when named."""
    from ray.runtime_env import RuntimeEnv
    wd = _project(tmp_path / "proj")
    for name in ("S3_ENDPOINT_URL", *CHECKSUM_ENV):  # unset, and restored after: job_env_vars fills them in
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://s3.internal:7480")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, ["cluster.max_file_mb=1"]).cluster
    env = build_runtime_env(cfg, wd, job_env_vars(cfg))
    assert env["working_dir"] == str(wd.resolve()) and "pip" not in env
    assert _ray_zip_names(wd, env["excludes"], tmp_path) == {"setup.cfg", "trainer/cli.py", "configs/a.yaml",
                                                             ".gitignore", "reqs/gpu.txt"}
    assert "weights.bin (2.0 MiB > cluster.max_file_mb=1) stays behind" in capsys.readouterr().out
    assert env["env_vars"]["S3_ENDPOINT_URL"] == "http://s3.internal:7480"
    assert env["env_vars"]["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert env["env_vars"]["WANDB_MODE"] == "offline"
    assert "do-not-ship" not in str(env)
    named = load_config(None, ["cluster.env_vars=[AWS_SECRET_ACCESS_KEY]"]).cluster
    assert job_env_vars(named)["AWS_SECRET_ACCESS_KEY"] == "do-not-ship"
    with pytest.raises(ConfigError, match="NOT_SET_HERE"):
        job_env_vars(load_config(None, ["cluster.env_vars=[NOT_SET_HERE]"]).cluster)

    pip = build_runtime_env(load_config(None, ["cluster.runtime_env=pip"]).cluster, wd, {})
    assert pip["pip"]["packages"] == ["torch>=2.4", "numpy>=1.24,<2.2", "s3fs>=2025.1"]  # the cluster's Ray runs it
    req = build_runtime_env(load_config(None, ["cluster.runtime_env=pip", "cluster.requirements=reqs/gpu.txt"]).cluster,
                            wd, {})
    assert req["pip"]["packages"] == ["torch>=2.4"]
    with pytest.raises(ConfigError, match="no file .*nope.txt"):
        build_runtime_env(load_config(None, ["cluster.runtime_env=pip", "cluster.requirements=nope.txt"]).cluster, wd, {})
    RuntimeEnv(**pip)  # Ray's own validation of every field

    image_cfg = load_config(None, ["cluster.runtime_env=image", "cluster.image=registry.example/crossflow:1"]).cluster
    image = build_runtime_env(image_cfg, wd, {"WANDB_MODE": "offline"})
    assert image == {"image_uri": "registry.example/crossflow:1", "env_vars": {"WANDB_MODE": "offline"}}
    RuntimeEnv(**image)
    assert build_entrypoint(str(wd / "configs/a.yaml"), ["train.steps=2"], wd, cluster=image_cfg) == \
        "cd /workspace/crossflow && python -m cluster.cli train --config configs/a.yaml train.steps=2"
    with pytest.raises(ConfigError, match="cluster.image='x' is set but cluster.runtime_env='pip'"):
        load_config(None, ["cluster.runtime_env=pip", "cluster.image=x"])

    with pytest.raises(ConfigError, match=r"over Ray's working_dir limit of 1 MiB; largest files: weights.bin"):
        build_runtime_env(load_config(None, ["cluster.max_file_mb=4"]).cluster, wd, {}, limit_bytes=1 << 20)


def test_submit_names_an_unreachable_dashboard(capsys):
    from cluster.cli import main
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["submit", "--address", address, "--config", str(REPO / "configs/demo.yaml")]) == 2
    assert f"no Ray dashboard answers at {address}" in capsys.readouterr().err


def shipped_copy(dest: Path, marker_dir: Path) -> Path:
    """The repository's shipped files copied to ``dest``, its ``trainer`` package changed to record,
    in ``marker_dir``, the path every process imported it from."""
    files, _ = shipped_files(REPO, DEFAULT_EXCLUDES)
    for rel, _ in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    with (dest / "trainer" / "__init__.py").open("a") as f:
        f.write(f"import os as _os\nopen(_os.path.join({str(marker_dir)!r}, str(_os.getpid())), 'w')"
                f".write(__file__)\n")
    return dest


def submit(ray_head: str, run_dir: Path, working_dir: Path = REPO, **extra) -> str:
    out = run(cli("submit", "--address", ray_head, "--python", sys.executable, "--working-dir", str(working_dir),
                  "--config", str(working_dir / "configs/shapes_tiny.yaml"), *ray_tiny_overrides(run_dir, **extra)),
              timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return re.search(r"submitted (\S+) to", out.stdout).group(1)


def wait_terminal(ray_head: str, job_id: str, timeout: float = 300) -> str:
    """The job's status, as `crossflow jobs status` prints it, once the job has ended. The wait polls
    with Ray's SDK (``wait_for_job``, as `jobs logs --follow` does): a `crossflow jobs status` process
    per poll would take seconds of a CPU core from the jobs each time."""
    wait_for_job(ray_head, job_id, timeout=timeout, poll=0.5)
    return run(cli("jobs", "status", job_id, "--address", ray_head), timeout=60).stdout.strip()


def wait_logged_step(run_dir: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and "loss" in (run_dir / "metrics.jsonl").read_text()):
        assert time.monotonic() < deadline, f"no logged step within {timeout} s"
        time.sleep(0.5)


@pytest.mark.slow
def test_submit_follow_and_stop_on_a_real_head(ray_head, tmp_path):
    """A tiny run submitted as a Ray Job from a copy of the repository succeeds (status, logs, its
    files), and the driver and both workers ran the copy Ray shipped (unpacked in its working_dir
    cache), not the installed crossflow; a long one, submitted alongside it, is stopped with `jobs
    stop`: a final checkpoint at a logging step, and no worker left behind."""
    run_dir, markers, long_dir = tmp_path / "run", tmp_path / "imported_from", tmp_path / "long"
    markers.mkdir()
    job_id = submit(ray_head, run_dir, working_dir=shipped_copy(tmp_path / "copy", markers))
    long_id = submit(ray_head, long_dir, **{"train.steps": 100000})  # at once: the head has a CPU per worker

    wait_logged_step(long_dir)
    pids = [int((long_dir / PID_DIR / f"rank{r}.pid").read_text()) for r in (0, 1)]
    stop = run(cli("jobs", "stop", long_id, "--address", ray_head), timeout=60)
    assert stop.returncode == 0 and "stop requested" in stop.stdout

    status = wait_terminal(ray_head, job_id)
    logs = run(cli("jobs", "logs", job_id, "--address", ray_head), timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert "trained 4 steps" in logs
    imported_from = {p.read_text() for p in markers.iterdir()}
    assert len(list(markers.iterdir())) >= 3, imported_from  # the driver and 2 workers (at least)
    assert all("/runtime_resources/working_dir_files/" in p for p in imported_from), imported_from
    assert (run_dir / "samples" / "final.png").is_file()
    assert (run_dir / "ray" / "run" / "step_00000004" / "trainer.pt").is_file()
    stop = run(cli("jobs", "stop", job_id, "--address", ray_head), timeout=60)
    assert stop.returncode == 0 and "not running" in stop.stdout

    status = wait_terminal(ray_head, long_id, timeout=180)
    logs = run(cli("jobs", "logs", long_id, "--address", ray_head), timeout=60).stdout
    assert status == "STOPPED", logs[-4000:]
    stopped = int(re.search(r"stopped at step (\d+)", logs).group(1))
    assert 0 < stopped < 100000 and stopped % 2 == 0  # a logging step (log_every=2)
    assert latest_checkpoint(long_dir).name == f"step_{stopped:08d}"
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
