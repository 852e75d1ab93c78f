"""`crossflow train` on the embedded Ray cluster: 2 DeepSpeed workers, a report lost with a worker (the
depth task), Ctrl-C (the captioning task).
(A worker killed mid-run on a cluster of two nodes: tests/cluster/test_two_nodes.py.)"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from cluster.ray_train import PID_DIR, rank_files
from data_pipeline.shapes import ShapesGenerator
from tests.cluster.conftest import REPO, cli, ray_tiny_overrides, run as run_cli
from tests.support.faults import fault_env, kill_before_report
from trainer.checkpoint import latest_checkpoint
from trainer.metrics import read_metrics

pytestmark = pytest.mark.slow


def loss_records(run: Path) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def check_console(out: str, rank1_pids: set[int], steps: int, every: int) -> None:
    """What the user read: rank 0's progress once per logging interval and each checkpoint once (step,
    loss, path); nothing of rank 1's own (its death is Ray's to report); no per-rank report dicts and
    no warning our code causes."""
    rank1 = [line for line in out.splitlines() if any(f"pid={p})" in line or f"pid={p}," in line for p in rank1_pids)]
    assert not rank1, rank1[:10]
    assert f"step {steps}/{steps} (100%)  loss " in out
    assert not re.search(r"train: +\d+%\|", out)  # no tqdm bar: a worker's output is not a terminal
    assert re.search(rf"checkpoint step {every} \(loss \d\.\d{{4}}\): \S+step_{every:08d}", out)
    assert "TrainingReport(" not in out and "FutureWarning" not in out and "DeprecationWarning" not in out


def test_rank_files_partition_a_checkpoint(tmp_path):
    names = ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
             "zero_pp_rank_1_mp_rank_00_optim_states.pt", "zero_pp_rank_10_mp_rank_00_model_states.pt",
             "rng_rank0.pt", "rng_rank1.pt", "ema_rank1.pt", "ema.pt", "trainer.pt", "weights.safetensors",
             "config.yaml"]
    for n in names:
        (tmp_path / n).write_text("")
    by_rank = {r: {p.name for p in rank_files(tmp_path, r)} for r in (0, 1, 10)}
    assert by_rank[1] == {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt", "ema_rank1.pt"}
    assert by_rank[10] == {"zero_pp_rank_10_mp_rank_00_model_states.pt"}
    assert set().union(*by_rank.values()) == set(names) and sum(map(len, by_rank.values())) == len(names)


def test_worker_lost_before_reporting_resumes_from_the_runs_own_copy_with_s3_storage(bucket, tmp_path):
    """The depth task (image VE -> depth map, configs/tasks/depth.yaml) on 2 workers, with Ray
    Train's storage on the real RGW (cluster.storage_path=s3://...). Rank 1 dies after
    checkpoint 10 is complete but before Ray heard of it: Ray can hand the restarted group only
    checkpoint 5 (downloaded from S3), so the ranks agree on the run's own copy of step 10 instead,
    redo nothing, skip no data, and every reported checkpoint lands in the bucket with every
    rank's files (Arrow's S3 client, endpoint and checksum policy from the environment)."""
    from data_pipeline.s3 import s3_filesystem
    run, steps = tmp_path / "run", 15
    cmd = cli("train", "--config", "configs/tasks/depth.yaml",
              *ray_tiny_overrides(run, **{"train.steps": steps, "train.ckpt_every": 5, "train.log_every": 5,
                                          "cluster.max_failures": 1, "cluster.storage_path": f"{bucket}/ray"}))
    out = run_cli(cmd, env=fault_env(kill_before_report(rank=1, step=10)), timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000010'} at step 10" in out.stdout
    final = torch.load(run / "checkpoints" / f"step_{steps:08d}" / "trainer.pt", weights_only=False)
    per_epoch = 512 // 2 // 4
    assert final["step"] == steps
    assert final["data"]["epoch"] * per_epoch + final["data"]["batch_in_epoch"] == steps
    steps_logged = [r["step"] for r in loss_records(run)]
    assert steps_logged == [5, 10, 15]  # nothing redone, nothing skipped

    stored = {p.split("/", 3)[3] for p in s3_filesystem().find(f"{bucket}/ray/run")}
    for step in (5, 15):
        assert {f"step_{step:08d}/{name}" for name in ("trainer.pt", "rng_rank0.pt", "rng_rank1.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt", "weights.safetensors")} <= stored, sorted(stored)


def test_ctrl_c_stops_every_worker_with_a_final_checkpoint(tmp_path):
    """The captioning task (configs/tasks/captioning.yaml: image VE -> caption latent -> decoder) on 2
    workers. The first SIGINT to the driver: the workers stop together at the next logging step, write
    a final checkpoint there, and every worker process is gone when the command returns; `crossflow
    caption` reads that checkpoint."""
    run = tmp_path / "run"
    cmd = cli("train", "--config", "configs/tasks/captioning.yaml",
              *ray_tiny_overrides(run, **{"train.steps": 1000, "train.log_every": 5}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and loss_records(run), 240, proc, "the first logging step")
        pids = [int((run / PID_DIR / f"rank{r}.pid").read_text()) for r in (0, 1)]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    stopped = int(out.split("stopped at step ")[1].split(":")[0])
    assert 0 < stopped < 1000 and stopped % 5 == 0
    assert latest_checkpoint(run).name == f"step_{stopped:08d}"
    assert json.loads((run / "summary.json").read_text())["stopped"] is True
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

    image = tmp_path / "scene.png"
    Image.fromarray(ShapesGenerator(32, split="heldout").sample(0)["image"]).save(image)
    captioned = run_cli(cli("caption", "--checkpoint", str(latest_checkpoint(run)), "--image", str(image)), timeout=120)
    assert captioned.returncode == 0, captioned.stdout[-2000:] + captioned.stderr[-2000:]
    assert captioned.stdout.startswith(f"{image}: "), captioned.stdout
