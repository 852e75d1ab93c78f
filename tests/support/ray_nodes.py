"""Two Ray nodes on one machine, as ``ray start`` makes them on two: a head and a node that joins it.

``two_nodes(run_dir, node_b_disk, env)`` starts ``ray start --head --block`` (node A) and
``ray start --address ... --block`` (node B) at once, each with one CPU, its own temp dir and its
own ports. Node B's IP is 127.0.0.2, a loopback address other than the head's, so Ray sees two
hosts and gives each its own local ranks. Node B runs in its own mount namespace where ``run_dir``
is ``node_b_disk`` bind-mounted: the same path string names another folder on node B, as one path
on two machines' own disks does.
On leaving, every process of both nodes (the ``ray start`` processes, their children, and any
process naming the nodes' temp dirs) is killed by pid; nothing else on the machine is touched
(``ray stop`` would end every Ray cluster of this user).
"""
from __future__ import annotations

import contextlib
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mount_namespace_prefix() -> list[str] | None:
    """``unshare`` arguments that give a command its own mount namespace here (root, or user
    namespaces), or None when the machine allows neither."""
    for prefix in (["unshare", "--mount", "--propagation", "private"],
                   ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"]):
        with contextlib.suppress(OSError):
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return prefix
    return None


def node_args(ip: str, temp_dir: Path) -> list[str]:
    """One CPU and ports of its own (two raylets on one machine must not share any)."""
    return ["--block", "--num-cpus", "1", "--node-ip-address", ip, "--temp-dir", str(temp_dir),
            "--disable-usage-stats", "--node-manager-port", str(free_port()),
            "--object-manager-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()), "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port()), "--min-worker-port", "0", "--max-worker-port", "0"]


def launch(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_started(proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{shlex.join(proc.args[:8])}... did not start (rc {proc.poll()}):\n"
                                 f"{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop(procs: list[subprocess.Popen], temp_dirs: list[Path]) -> None:
    """SIGKILL the nodes' processes by pid: each ``ray start`` process, its descendants, and any
    process whose command line names one of the nodes' temp dirs."""
    found: dict[int, psutil.Process] = {}
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({p.pid: p for p in psutil.Process(proc.pid).children(recursive=True)})
    for p in psutil.process_iter(["cmdline"]):
        if any(str(t) in arg for t in temp_dirs for arg in p.info["cmdline"] or []):
            found[p.pid] = p
    for proc in procs:
        found.pop(proc.pid, None)
        proc.kill()
    for p in found.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(list(found.values()), timeout=10)
    for proc in procs:
        proc.wait()


@contextlib.contextmanager
def two_nodes(run_dir: Path, node_b_disk: Path, env: dict, keep_logs: Path | None = None):
    """Yields the head's address; node B's processes see ``node_b_disk`` at ``run_dir``. With
    ``keep_logs``, both nodes' Ray logs are copied there (``a/``, ``b/``) before the temp dirs go."""
    prefix = mount_namespace_prefix()
    assert prefix is not None, "no mount namespace (unshare) on this machine"
    run_dir.mkdir(parents=True, exist_ok=True)
    node_b_disk.mkdir(parents=True, exist_ok=True)
    # short temp dirs: Ray's unix socket paths under them must stay under 108 characters
    temp_dirs = [Path(tempfile.mkdtemp(prefix="cf-node-a-")), Path(tempfile.mkdtemp(prefix="cf-node-b-"))]
    procs: list[subprocess.Popen] = []
    try:
        port = free_port()
        head = [RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                "--ray-client-server-port", str(free_port()), *node_args("127.0.0.1", temp_dirs[0])]
        join = shlex.join([RAY, "start", "--address", f"127.0.0.1:{port}", *node_args("127.0.0.2", temp_dirs[1])])
        mount = shlex.join(["mount", "--bind", str(node_b_disk), str(run_dir)])
        logs = [t / "start.log" for t in temp_dirs]
        # both at once: node B retries the head's GCS until it answers
        procs += [launch(head, logs[0], env), launch([*prefix, "sh", "-c", f"{mount} && exec {join}"], logs[1], env)]
        for proc, log in zip(procs, logs):
            wait_started(proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        stop(procs, temp_dirs)
        if keep_logs is not None:
            for name, t in zip("ab", temp_dirs):
                for session in t.glob("session_2*"):
                    shutil.copytree(session / "logs", keep_logs / name, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("*.sock", "events", "export_events"))
        for t in temp_dirs:
            subprocess.run(["rm", "-rf", str(t)], check=False)
