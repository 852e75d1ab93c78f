"""`crossflow sweep run` on the embedded Ray cluster: every point a Ray Tune trial that runs a 2-worker
DeepSpeed Ray Train run; a worker killed inside one trial, the sweep's driver killed and run again,
then `crossflow sweep analyze`."""
from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.ray_train import PID_DIR
from tests.cluster.conftest import REPO, cli, run
from tests.support.faults import fault_env, kill_after_step
from tests.support.tiny_models import tiny_text_encoder
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow

SWEEP = "ci_sweep"
EVERY = 2  # train.ckpt_every
KILL_STEP = 5  # a worker kills itself after this optimizer step: its run resumes from checkpoint 4
WANDB_HEADER = 7  # bytes of a .wandb file before its first record (":W&B", magic, version)


class Console:
    """A process's merged stdout/stderr, read as it comes (a thread: the pipe never fills), each line
    with the seconds since the start (``log``)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.start = proc, [], time.monotonic()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line))

    @property
    def text(self) -> str:
        return "".join(line for _, line in self.lines)

    def log(self) -> str:
        return "".join(f"{t:6.1f} {line}" for t, line in self.lines)


def start(cmd: list[str], env: dict) -> subprocess.Popen:
    """The sweep driver in its own process group (with the embedded cluster it starts), to kill it whole."""
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_until(predicate, timeout: float, console: Console, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if console.proc.poll() is not None:
            raise AssertionError(f"the sweep ended (rc {console.proc.returncode}) before {what}:\n{console.text[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{console.text[-4000:]}")


def ray_processes(proc: subprocess.Popen) -> set[psutil.Process]:
    """The driver's descendants: the embedded cluster (GCS, raylet) and the trials' and workers' processes."""
    try:
        return set(psutil.Process(proc.pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return set()


def alive(processes) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def stored_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the checkpoints Ray Train stored for the run (its storage: <run>/ray/<run name>)."""
    return sorted(int(p.name.split("_")[1]) for p in (run_dir / "ray" / run_dir.name).glob("step_*"))


def untouched_state(run_dir: Path) -> dict[str, tuple]:
    """What a finished run must keep byte for byte when the sweep resumes: its metrics and pid files."""
    files = [run_dir / "metrics.jsonl", run_dir / "summary.json", *(run_dir / PID_DIR).glob("rank*.pid")]
    return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}


def loss_by_step(run_dir: Path) -> dict[int, float]:
    """Each logged step's loss; a step logged twice (redone after a restart) repeats its loss."""
    first: dict[int, float] = {}
    for r in (r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r):
        first.setdefault(r["step"], r["loss"])
        assert r["loss"] == pytest.approx(first[r["step"]], rel=1e-5), (run_dir.name, r["step"])
    return first


def resumed_at(text: str, run_dir: Path) -> list[int]:
    return [int(s) for s in re.findall(rf"resumed from {re.escape(str(run_dir))}/checkpoints/step_\d+ at step (\d+)",
                                       text)]


def test_sweep_resumes_a_killed_worker_and_a_killed_driver_then_analyzes(tmp_path):
    """2 sizes x 2 FLOP budgets (steps 2 to 16), 2 points at once. Run 1: a worker dies after step 5 in one trial, whose
    Train run restarts from checkpoint 4; once that happened, a trial finished and an unfinished one
    stored a checkpoint, the driver is SIGKILLed with its cluster. Run 2 (the same command) restores
    Tune's experiment: finished points do not start again (their files untouched), unfinished ones
    resume from their checkpoints, every point finishes; results.csv lists them, `sweep analyze`
    fits them, every W&B run is in the sweep's group, and no Ray process outlives the sweep."""
    out, marker = tmp_path / "sweep", tmp_path / "killed.json"
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({
        "name": SWEEP, "base_config": "configs/shapes_tiny.yaml", "out_dir": str(out),
        "overrides": ["model.preset=tiny", "model.kernels=torch", f"data.text_encoder={tiny_text_encoder()}",
                      "data.num_samples=512", "data.max_tokens=12", "train.global_batch_size=8",
                      "train.log_every=1", f"train.ckpt_every={EVERY}", "train.threads=1", "train.zero_stage=2",
                      "optim.warmup_steps=2", "sample.steps=2", "sample.num_prompts=1", "eval.shapes=false",
                      "log.wandb=offline", "cluster.num_workers=2"],
        # FLOPs per sample: 9.4e7 at width 64, 3.7e8 at 128; 8 samples a step
        "isoflop": {"budgets": [6e9, 1.2e10], "sizes": {"model.hidden_size": [64, 128]}},
        "resources": {"cpus": 1}, "max_concurrent": 2}, sort_keys=False))
    points = {"flops-6e9_hidden_size-64": 8, "flops-6e9_hidden_size-128": 2,
              "flops-1.2e10_hidden_size-64": 16, "flops-1.2e10_hidden_size-128": 4}  # point -> its steps
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           # Ray Train's controller polls its workers every 0.5 s: it has registered checkpoint 4 when the kill comes
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    env.update(fault_env(kill_after_step(KILL_STEP, marker), base=env))
    cmd = cli("sweep", "run", "--config", str(sweep_file))

    # run 1: until a worker died, a point finished and an unfinished point stored a checkpoint
    first = start(cmd, env)
    console, worker_pids, processes = Console(first), {}, set()
    try:
        def ready():
            processes.update(ray_processes(first))
            for name in points:  # pid -> point, before a restart rewrites the pid files
                worker_pids.update({int(t): name for p in (out / name / PID_DIR).glob("rank*.pid")
                                    if (t := p.read_text().strip()).isdigit()})
            if not marker.is_file():
                return None
            victim = worker_pids[json.loads(marker.read_text())["pid"]]
            finished = set(re.findall(rf"sweep {SWEEP}: (\S+) finished", console.text))
            unfinished = [n for n in points if n not in finished and stored_checkpoints(out / n)]
            restarted = KILL_STEP // EVERY * EVERY in resumed_at(console.text, out / victim)
            return restarted and finished and unfinished and (finished, unfinished)
        finished, unfinished = wait_until(ready, 600, console, "a worker killed and its run resumed, a "
                                                                       "finished and a checkpointed point")
        kept = {n: untouched_state(out / n) for n in finished}
        checkpointed = {n: stored_checkpoints(out / n)[-1] for n in unfinished}
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    console.thread.join(10)

    # run 2: the same command resumes the sweep
    second = start(cmd, env)
    again = Console(second)
    try:
        while second.poll() is None:
            processes.update(ray_processes(second))
            time.sleep(0.5)
        second.wait(400)
    finally:
        if second.poll() is None:
            os.killpg(second.pid, signal.SIGKILL)
    again.thread.join(10)
    (tmp_path / "run1.log").write_text(console.log())  # for a look after a failure
    (tmp_path / "run2.log").write_text(again.log())
    assert second.returncode == 0, again.text[-6000:]
    assert f"restored {out / 'tune'}" in again.text
    for name in finished:  # not run again: not started, its files as they were
        assert f"sweep {SWEEP}: {name} started" not in again.text
        assert untouched_state(out / name) == kept[name], name
    for name, step in checkpointed.items():  # resumed from (at least) the checkpoint stored before the kill
        assert resumed_at(again.text, out / name) and resumed_at(again.text, out / name)[0] >= step, name

    # every run finished (the worker killed in run 1 restarted its Train run from checkpoint 4, above)
    for name, steps in points.items():  # every step logged, a redone one with the same loss
        assert sorted(loss_by_step(out / name)) == list(range(1, steps + 1)), name
        assert json.loads((out / name / "summary.json").read_text())["steps"] == steps

    rows = {r["point"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert sorted(rows) == sorted(points)
    assert all(r["status"] == "finished" and int(r["steps"]) == points[n] and float(r["loss"]) > 0
               for n, r in rows.items()), rows
    assert all(n in again.text for n in points)  # the table, printed

    # every W&B offline run (one per launch) in the sweep's group: each file W&B wrote more than its
    # header into (a launch killed early leaves the header alone), the finished launch's above all
    for name in points:
        blobs = sorted((out / name / "wandb").glob("offline-run-*/*.wandb"))
        assert blobs and SWEEP.encode() in blobs[-1].read_bytes(), name
        assert all(SWEEP.encode() in b.read_bytes() for b in blobs if b.stat().st_size > WANDB_HEADER), name

    analysis = run(cli("sweep", "analyze", str(out)), timeout=300)
    assert analysis.returncode == 0, analysis.stdout[-3000:] + analysis.stderr[-3000:]
    assert (out / "analysis" / "fit.json").is_file()

    deadline = time.monotonic() + 30  # the killed cluster's processes and the second one's are gone
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(processes), [(p.pid, p.name()) for p in alive(processes)]
