"""`crossflow train` on a Ray cluster of two nodes, each with its own run directory, a worker killed.

The two nodes are two ``ray start`` raylets on this machine (``tests/support/ray_nodes.py``): node B
joins the head with another loopback IP, so Ray sees two hosts. Users on real nodes give every node
the same ``train.out_dir`` path on its own local disk; here node B runs in its own mount namespace in
which that path is another folder bind-mounted over it: the same path string, two folders, and no
code of ours knows. Ray's storage (``cluster.storage_path``) is a third folder both nodes reach, as
a shared file system or S3 would be. ``STRICT_SPREAD`` puts one worker on each node.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from cluster.ray_train import PID_DIR
from tests.cluster.conftest import REPO, cli
from tests.cluster.test_ray_train import check_console, wait_for
from tests.golden import assert_matches_golden, golden, golden_overrides
from tests.support.faults import fault_env, kill_after_step
from tests.support.ray_nodes import mount_namespace_prefix, two_nodes
from trainer.checkpoint import list_checkpoints, resume_files
from trainer.metrics import read_metrics

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mount_namespace_prefix() is None, reason="needs a mount namespace (unshare)")]


def node_losses(node: Path) -> list[dict]:
    path = node / "metrics.jsonl"
    return [r for r in read_metrics(path) if "loss" in r] if path.is_file() else []


def listing(ckpt: Path) -> set[str]:
    return {p.name for p in ckpt.iterdir()} if ckpt.is_dir() else set()


def worker_pid(node: Path) -> tuple[int, int]:
    """(rank, pid) of the worker whose pid file on ``node`` is newest."""
    path = max((node / PID_DIR).glob("rank*.pid"), key=lambda p: p.stat().st_mtime)
    return int(path.stem[len("rank"):]), int(path.read_text())


def ray_failures(logs: Path) -> str:
    """What the nodes' Ray logs say about each failure (a failing run's driver output shows only the
    last error): Ray Train's controller's warnings, errors and failure decisions (their first lines),
    and the raylets' words on killed workers."""
    lines = []
    for f in sorted(logs.glob("*/train/*controller*.log")):
        for record in map(json.loads, filter(str.strip, f.read_text(errors="replace").splitlines())):
            if "FailurePolicy" in record["message"] or record["levelname"] in ("WARNING", "ERROR"):
                lines += [f"{record['asctime']} {record['levelname']}", *record["message"].splitlines()[:12]]
    for f in sorted(logs.glob("*/raylet.out")):
        lines += [f"{f.parent.name}/raylet: {line[:300]}" for line in f.read_text(errors="replace").splitlines()
                  if any(k in line for k in ("OOM", "memory monitor", "Killing worker", "SIGKILL", "exited with"))]
    return "\n".join(["Ray logs:", *lines[:120], "driver output:", ""])


def test_two_nodes_worker_killed_resumes_from_its_ranks_files(tmp_path):
    """The golden run's config on 2 workers, one per node, 30 steps, checkpoint at step 20; SIGKILL
    node B's worker after a step past 20. Ray restarts the group from checkpoint 20: the run ends
    at step 30, every step is logged, steps 1-20 reproduce the golden losses, redone steps repeat
    their loss, nothing is skipped in the data. The restarted worker on the node that held no copy
    of checkpoint 20 fetched from Ray's storage exactly the files its rank reads (its shards, RNG,
    the shared files), not the other rank's; the other node fetched only what it lacked. Neither
    node keeps a ``.tmp-step_*`` or more than ``train.keep_last`` checkpoints.

    The worker kills itself (``tests/support/faults.py``) after step 25, before the run can end: a
    kill from outside, timed on the logged steps, could land after the last step on a slow machine."""
    run, disk_b, storage = tmp_path / "run", tmp_path / "node_b_disk", tmp_path / "storage"
    marker = tmp_path / "killed.json"
    nodes = {"a": run, "b": disk_b}  # node B's folder, as this (node A's) process sees it
    steps, every, keep = 30, 20, 2
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           # Ray Train's controller (an actor on the nodes) polls every 0.5 s: it has registered
           # checkpoint 20 when the kill comes
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    env.update(fault_env(kill_after_step(every + 5, marker, node_ip="127.0.0.2"), base=env))
    with two_nodes(run, disk_b, env, keep_logs=tmp_path / "ray_logs") as address:
        cmd = cli("train", "--config", golden()["config"], *golden_overrides(run, **{
            "train.steps": steps, "train.ckpt_every": every, "train.keep_last": keep, "log.progress": True,
            "cluster.address": address, "cluster.storage_path": str(storage), "cluster.num_workers": 2,
            "cluster.cpus_per_worker": 1, "cluster.placement_strategy": "STRICT_SPREAD",
            "cluster.max_failures": 1}))
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(marker.is_file, 300, proc, "node B's worker to kill itself after step 25")
            killed = json.loads(marker.read_text())
            # what each node held of checkpoint 20 when its worker died (the restart's fetch comes later)
            before = {k: listing(n / "checkpoints" / f"step_{every:08d}") for k, n in nodes.items()}
            killed_rank, pid, killed_at = killed["rank"], killed["pid"], killed["time"]
            out, _ = proc.communicate(timeout=400)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                proc.wait(60)
    (tmp_path / "driver.log").write_text(out)
    assert proc.returncode == 0, ray_failures(tmp_path / "ray_logs") + out[-4000:]
    assert f"trained {steps} steps" in out
    assert f"at step {every}" in out  # "resumed from ... at step 20": not from step 0
    new_pids = {k: worker_pid(n) for k, n in nodes.items()}
    assert all((n / PID_DIR / f"rank{r}.pid").stat().st_mtime > killed_at for (r, _), n in
               zip(new_pids.values(), nodes.values()))  # both nodes' workers restarted
    check_console(out, rank1_pids={p for r, p in [(killed_rank, pid), *new_pids.values()] if r == 1},
                  steps=steps, every=every)

    # every step logged (on rank 0's node, which may change at the restart); the golden losses up to 20
    records = [r for n in nodes.values() for r in node_losses(n)]
    first = {}
    for r in records:
        first.setdefault(r["step"], r["loss"])
        assert r["loss"] == pytest.approx(first[r["step"]], rel=1e-5), r["step"]  # a redone step repeats
    assert sorted(first) == list(range(1, steps + 1))
    assert_matches_golden(first, "Ray, 2 nodes, before the kill")

    # Ray's copy of each checkpoint holds every rank's files; the data position is the planned one
    stored = {s: listing(storage / run.name / f"step_{s:08d}") for s in (every, steps)}
    for names in stored.values():
        assert {"trainer.pt", "rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    final = torch.load(storage / run.name / f"step_{steps:08d}" / "trainer.pt", weights_only=False)
    o = golden()["overrides"]
    per_epoch = o["data.num_samples"] // 2 // (o["train.global_batch_size"] // 2)
    assert final["step"] == steps
    assert final["data"]["epoch"] * per_epoch + final["data"]["batch_in_epoch"] == steps

    # what each restarted worker fetched into its node's folder: its rank's files and the shared ones
    after = {k: listing(n / "checkpoints" / f"step_{every:08d}") for k, n in nodes.items()}
    for k, (rank, _) in new_pids.items():
        wanted = set(resume_files(stored[every], rank))
        assert after[k] - before[k] <= wanted, (k, rank, sorted(after[k] - before[k]))
        assert wanted <= after[k], (k, rank)
    bare = [k for k in nodes if not before[k]]  # the node that was not rank 0's before the kill
    assert len(bare) == 1 and after[bare[0]] == set(resume_files(stored[every], new_pids[bare[0]][0]))
    assert after[bare[0]] != stored[every]  # not the whole merged checkpoint
    assert "weights.safetensors" in stored[every] and "weights.safetensors" not in after[bare[0]]

    for k, n in nodes.items():
        assert not list((n / "checkpoints").glob(".tmp-step_*")), k
        assert len(list_checkpoints(n)) <= keep, (k, list_checkpoints(n))
    summaries = [json.loads((n / "summary.json").read_text()) for n in nodes.values() if (n / "summary.json").is_file()]
    assert [s["steps"] for s in summaries] == [steps]  # rank 0's, on its node
