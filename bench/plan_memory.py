"""`crossflow plan`'s memory estimate next to the measured peak of short training runs.

    python bench/plan_memory.py                          # CPU: 70M preset on 32 px shapes, micro-batch 8
    python bench/plan_memory.py --device cuda --preset 0.95B --precision bf16 --micro-batch 16 --resolution 256

Each case runs `crossflow train --no-ray` (one process, ZeRO-2) for a few steps and reads the
largest `peak_memory_gb` of its metrics.jsonl: torch.cuda.max_memory_allocated on CUDA, the
process's max RSS on CPU. The estimate is the plan's `allocated` (what those count). On CPU the
process also holds Python, torch and DeepSpeed themselves, so a run of the tiny preset is measured
too and subtracted from both sides; and RSS counts only the touched part of DeepSpeed's reduce
bucket (min(bucket, parameters) elements), which the CPU estimate uses instead of the whole bucket.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import load_config  # noqa: E402
from trainer.plan import GIB, REDUCE_BUCKET_ELEMENTS, Hardware, make_plan  # noqa: E402


def overrides(a: argparse.Namespace, out_dir: Path, preset: str, ac: bool) -> list[str]:
    values = {
        "model.preset": preset, "model.kernels": "torch", "data.resolution": a.resolution,
        "data.text_encoder": "hashed-words-32", "data.max_tokens": 12, "data.num_samples": 512,
        "train.steps": a.steps, "train.global_batch_size": a.micro_batch, "train.grad_accum": 1,
        "train.log_every": 1, "train.ckpt_every": 0, "train.out_dir": str(out_dir), "train.device": a.device,
        "train.precision": a.precision, "train.zero_stage": 2, "train.activation_checkpointing": ac,
        "train.memory_check": False, "optim.warmup_steps": 1, "sample.steps": 1, "sample.num_prompts": 1,
        "eval.shapes": False, "log.wandb": "disabled", "log.progress": False, "cluster.num_workers": 1,
    }
    return [f"{k}={v}" for k, v in values.items()]


def measure(a: argparse.Namespace, preset: str, ac: bool) -> tuple[float, float]:
    """(estimated allocated GiB, measured peak GiB) of one case."""
    out = Path(tempfile.mkdtemp(prefix="plan-memory-"))
    try:
        over = overrides(a, out / "run", preset, ac)
        plan = make_plan(load_config(None, over), Hardware(gpu_memory_gb=1e6))
        estimate = plan.allocated_gib
        if a.device == "cpu":  # RSS holds only the touched part of the reduce bucket
            wb = 2 if a.precision == "bf16" else 4
            estimate -= wb * (REDUCE_BUCKET_ELEMENTS - min(REDUCE_BUCKET_ELEMENTS, plan.trainable_params)) / GIB
        cmd = [sys.executable, "-m", "cluster.cli", "train", "--no-ray", *over]
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
        measured = max(r["peak_memory_gb"] for r in records if "peak_memory_gb" in r)
        return estimate, measured
    finally:
        shutil.rmtree(out, ignore_errors=True)


def phases(a: argparse.Namespace) -> None:
    """CPU only, in this process: resident memory after each phase of two training steps of the
    preset (no AC), next to the plan's terms; shows which part of the gap is the allocator's."""
    import resource

    import torch

    from kernels import get_ops
    from trainer.engine import Engine, init_distributed
    from trainer.loop import build_model
    from trainer.objectives import crossflow_losses, draw_noise

    def now() -> float:  # resident set, GiB
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / GIB

    def peak() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    cfg = load_config(None, overrides(a, Path(tempfile.mkdtemp()) / "run", a.preset, False))
    plan = make_plan(cfg, Hardware(gpu_memory_gb=1e6))
    m = plan.memory_gib
    print(f"plan: weights {m['weights']:.2f}, fp32 grad partition + touched bucket "
          f"{2 * 4 * plan.trainable_params / GIB:.2f}, optimizer {m['optimizer']:.2f}, EMA {m['ema']:.2f}, "
          f"activations {m['activations']:.2f}, step temporaries {m['step_temporaries']:.2f} GiB")
    info = init_distributed("cpu")
    shape, cpu = (3, a.resolution, a.resolution), torch.device("cpu")
    rows = [("start", now(), peak())]
    model = build_model(cfg, shape, 32, cpu)
    rows.append(("model built", now(), peak()))
    engine = Engine(model, cfg.train, cfg.optim, a.micro_batch, info)
    rows.append(("engine (DeepSpeed + EMA)", now(), peak()))
    ops, B = get_ops("torch", cpu), a.micro_batch
    for step in range(2):
        z1, emb = torch.randn(B, *shape), torch.randn(B, cfg.data.max_tokens, 32)
        mask = torch.ones(B, cfg.data.max_tokens, dtype=torch.bool)
        noise = draw_noise(cfg.objective, 0, step, 0, B, 0, 1, shape, cpu)
        losses = crossflow_losses(engine.module, z1, emb, mask, cfg.objective, ops, noise)
        rows.append((f"step {step + 1} forward", now(), peak()))
        engine.backward(losses.total)
        rows.append((f"step {step + 1} backward", now(), peak()))
        engine.step()
        rows.append((f"step {step + 1} optimizer", now(), peak()))
    print("| after | resident (GiB) | peak so far (GiB) |\n|---|---|---|")
    for name, cur, top in rows:
        print(f"| {name} | {cur:.2f} | {top:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="70M")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=32, help="shapes images (pixel space) of this side")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--phases", action="store_true", help="CPU: resident memory after each phase, in-process")
    a = p.parse_args()
    if a.phases:
        return phases(a)
    base_est = base_meas = 0.0
    if a.device == "cpu":
        base_est, base_meas = measure(a, "tiny", False)
    print(f"device {a.device}, preset {a.preset}, {a.precision}, ZeRO-2, 1 process, micro-batch {a.micro_batch}, "
          f"{a.resolution} px, {time.strftime('%Y-%m-%d')}")
    if a.device == "cpu":
        print(f"process baseline (tiny preset): estimate {base_est:.2f} GiB, measured RSS {base_meas:.2f} GiB")
    print("| activation checkpointing | estimate (GiB) | measured (GiB) | estimate / measured |")
    print("|---|---|---|---|")
    for ac in (False, True):
        est, meas = measure(a, a.preset, ac)
        est, meas = est - base_est, meas - base_meas
        print(f"| {'on' if ac else 'off'} | {est:.2f} | {meas:.2f} | {est / meas:.2f} |", flush=True)


if __name__ == "__main__":
    main()
