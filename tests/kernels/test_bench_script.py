"""bench/kernels.py runs: the no-GPU message, and --smoke through every op on CPU."""
from __future__ import annotations

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


def test_smoke_run_covers_every_op():
    proc = run("--smoke")
    assert proc.returncode == 0, proc.stderr
    assert "NOT a measurement" in proc.stdout
    for op in ("attention", "flow_matching_loss", "interpolate", "modulate", "gated_residual"):
        assert f"| {op} |" in proc.stdout
