"""The bench scripts run: kernels.py's no-GPU message and --smoke through every op on CPU, and
train_step.py through the engine in miniature."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the bench would measure")
def test_without_cuda_says_nothing_was_measured():
    proc = run()
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device: nothing measured" in proc.stdout


def test_smoke_run_covers_every_op_and_writes_the_auto_table(tmp_path):
    """--smoke --write-table: every op measured, checked against the reference, and written as a
    device-class entry that kernels.auto_table reads back (validated); other entries kept."""
    from kernels import auto_table
    table = tmp_path / "auto_table.json"
    table.write_text((Path(auto_table.TABLE_PATH)).read_text())  # start from the shipped one
    proc = run("--smoke", "--write-table", "--table", str(table))
    assert proc.returncode == 0, proc.stderr
    assert "NOT a measurement" in proc.stdout
    ops = ("attention", "flow_matching_loss", "interpolate", "modulate", "gated_residual")
    for op in ops:
        assert f"| {op} |" in proc.stdout
    classes = auto_table.load_table(table)["device_classes"]
    assert classes["sm90-h100"] == auto_table.load_table()["device_classes"]["sm90-h100"]
    entry = classes["cpu-smoke"]
    assert entry["source"]["command"] == f"python bench/kernels.py --smoke --write-table --table {table}"
    assert {m["op"] for m in entry["measurements"]} == set(ops)
    assert all(m["triton_correct"] and m["dtype"] == "float32" for m in entry["measurements"])
    assert run("--smoke", "--write-table").returncode == 2  # never into the shipped table


def test_train_step_bench_runs_on_cpu(tmp_path):
    """bench/train_step.py through the real engine in miniature: one setting, one batch, its
    markdown row and its JSON line (the per-op kernel mix exercises compose_ops)."""
    script = SCRIPT.parent / "train_step.py"
    proc = subprocess.run([sys.executable, str(script), "--batches", "2", "--steps", "1", "--warmup", "1",
                           "--kernels", "attention=torch+modulate=torch", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| attention=torch+modulate=torch | False | False | 2 |" in proc.stdout, proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "train_step.jsonl").read_text().splitlines()]
    assert rows[0]["micro_batch"] == 2 and rows[0]["images_s"] > 0 and rows[0]["resolved_ops"]["attention"] == "torch"
