"""Rewrite tests/golden/tiny_run.json from a fresh run of the golden config (one process, CPU).

    PYTHONPATH=. python -m tests.golden.regenerate

Commit the result only with the reason the numbers moved; the diff of the losses is the review.
The config and overrides are the file's own: edit them there first if the golden run itself changes.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.golden import GOLDEN_FILE, golden, golden_overrides

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINT = "cluster.cli"  # the `crossflow` console command's module


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}


def run_golden(out_dir: Path) -> dict[int, float]:
    old = golden()
    cmd = [sys.executable, "-m", ENTRY_POINT, "train", "--no-ray", "--config", old["config"], *golden_overrides(out_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "WANDB_MODE": "disabled"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def main() -> None:
    data = golden()
    with tempfile.TemporaryDirectory() as tmp:
        losses = run_golden(Path(tmp) / "run")
    data["losses"] = {str(s): losses[s] for s in sorted(losses)}
    data["versions"] = versions()
    GOLDEN_FILE.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE}: steps {min(losses)}..{max(losses)}, loss {losses[min(losses)]:.6f} -> "
          f"{losses[max(losses)]:.6f}")


if __name__ == "__main__":
    main()
