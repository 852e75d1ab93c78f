"""Host memory each rank spends building the consolidated EMA weights at a checkpoint save.

    python bench/ckpt_memory.py                               # tiny and 70M, ZeRO 2 and 3, this checkout
    python bench/ckpt_memory.py --code /path/to/other/checkout  # the same runs of another version

Each case is `crossflow train` under torchrun (2 ranks on gloo, CPU) for one step, whose final
save builds the float32 CPU copy of the EMA that weights.safetensors holds
(`Engine.ema_full_state_dict`). The measuring probe of `tests/support/faults.py`
(`measure_ema_weights`, installed from outside the code through `sitecustomize`) records on each
rank the bytes of the copy that call returned and how far the rank's peak RSS rose during it
(`/proc/self/clear_refs` resets the peak first: Linux only). `--code` runs another checkout's
trainer with this checkout's probe, for a before/after comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.faults import fault_env, measure_ema_weights  # noqa: E402
from tests.support.tiny_models import tiny_text_encoder  # noqa: E402

MIB = 2**20


def overrides(out_dir: Path, preset: str, stage: int) -> list[str]:
    values = {
        "model.preset": preset, "model.kernels": "torch", "data.resolution": 32,
        "data.text_encoder": tiny_text_encoder(), "data.max_tokens": 12, "data.num_samples": 64,
        "train.steps": 1, "train.global_batch_size": 4, "train.log_every": 1, "train.ckpt_every": 0,
        "train.out_dir": str(out_dir), "train.threads": 1, "train.zero_stage": stage, "train.ema_decay": 0.999,
        "train.memory_check": False, "optim.warmup_steps": 1, "sample.steps": 1, "sample.num_prompts": 1,
        "eval.shapes": False, "log.wandb": "disabled", "log.progress": False,
    }
    return [f"{k}={v}" for k, v in values.items()]


def measure(code: Path, preset: str, stage: int) -> list[dict]:
    """Per rank: {"bytes": copy built, "peak_rss_rise": bytes} of the one save."""
    out = Path(tempfile.mkdtemp(prefix="ckpt-memory-"))
    try:
        probe = out / "probe"
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               **fault_env(measure_ema_weights(probe, peak_rss=True), base={"PYTHONPATH": str(code)})}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "cluster.cli", "train", *overrides(out / "run", preset, stage)]
        subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return [json.loads((probe / f"ema_weights_rank{r}.jsonl").read_text().splitlines()[-1]) for r in (0, 1)]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose trainer runs (default: this one)")
    p.add_argument("--presets", nargs="+", default=["tiny", "70M"])
    p.add_argument("--stages", nargs="+", type=int, default=[2, 3])
    a = p.parse_args()
    print(f"code: {a.code}")
    print("| preset | ZeRO | rank 0: copy / peak RSS rise (MiB) | rank 1: copy / peak RSS rise (MiB) |")
    print("|---|---|---|---|")
    for preset in a.presets:
        for stage in a.stages:
            ranks = measure(a.code.resolve(), preset, stage)
            cells = " | ".join(f"{r['bytes'] / MIB:.1f} / {r['peak_rss_rise'] / MIB:.1f}" for r in ranks)
            print(f"| {preset} | {stage} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
