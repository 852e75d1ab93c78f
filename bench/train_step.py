"""Training-step benchmark: step time, samples/s and MFU for a preset and batch on this device.

    python bench/train_step.py --preset tiny --batch 64                       # CPU
    python bench/train_step.py --preset 0.95B --batch 64 --precision bf16 --zero 2 [--ac] [--compile]

Runs the real engine (DeepSpeed, one process) on synthetic batches of the preset's paper shapes
(latent 4x32x32, 77 text tokens of width 768; the tiny preset uses its 3x32x32 pixels and 16
tokens). Prints one markdown row per configuration; ``--find-max-batch`` doubles the batch
until out of memory (GPU). MFU counts the flow transformer's training FLOPs
(``CrossFlow.flops_per_sample``) against ``--peak-tflops`` (989 = H100 dense bf16).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import Config, ModelConfig  # noqa: E402
from trainer.engine import Engine, init_distributed  # noqa: E402
from trainer.loop import build_model  # noqa: E402
from trainer.objectives import crossflow_losses, draw_noise  # noqa: E402


def shapes_for(preset: str) -> tuple[tuple[int, int, int], int, int]:
    if preset == "tiny":
        return (3, 32, 32), 16, 384
    return (4, 32, 32), 77, 768


def run(args, batch: int, ac: bool, compile_: bool) -> dict:
    cfg = Config()
    cfg.model = ModelConfig(preset=args.preset, kernels=args.kernels)
    latent, tokens, text_dim = shapes_for(args.preset)
    cfg.data.max_tokens = tokens
    cfg.train.global_batch_size = batch
    cfg.train.precision = args.precision
    cfg.train.zero_stage = args.zero
    cfg.train.activation_checkpointing = ac
    cfg.train.compile = compile_
    cfg.train.steps = args.steps + args.warmup
    cfg.optim.warmup_steps = 0
    info = init_distributed("auto")
    torch.manual_seed(0)
    model = build_model(cfg, latent, text_dim, info.device)
    engine = Engine(model, cfg.train, cfg.optim, batch, info)
    dev = info.device
    z1 = torch.randn(batch, *latent, device=dev)
    emb = torch.randn(batch, tokens, text_dim, device=dev)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=dev)
    ops = model.flow.blocks[0].ops
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for i in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        noise = draw_noise(cfg.objective, 0, i, 0, batch, 0, 1, latent, dev)
        with engine.autocast():
            losses = crossflow_losses(engine.module, z1, emb, mask, cfg.objective, ops, noise)
        engine.backward(losses.total)
        engine.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    fps = engine.module.flops_per_sample()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (989e12 if dev.type == "cuda" else 0)
    mem = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return {"batch": batch, "ac": ac, "compile": compile_, "step_s": step, "samples_s": batch / step,
            "mfu": fps * batch / step / peak if peak else float("nan"), "mem_gb": mem,
            "flow_params_M": engine.module.flow_params() / 1e6}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--kernels", default="auto")
    p.add_argument("--ac", action="store_true", help="also measure with activation checkpointing")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile on the blocks")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    args = p.parse_args()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; preset {args.preset}, {args.precision}, ZeRO-{args.zero}, kernels {args.kernels}")
    print("| batch | act. ckpt | compile | step (s) | samples/s | MFU | peak mem (GiB) | flow params (M) |")
    print("|---|---|---|---|---|---|---|---|")
    for ac in ([False, True] if args.ac else [False]):
        for comp in ([False, True] if args.compile else [False]):
            r = run(args, args.batch, ac, comp)
            print(f"| {r['batch']} | {ac} | {comp} | {r['step_s']:.4f} | {r['samples_s']:.1f} | {r['mfu']:.3f} | "
                  f"{r['mem_gb']:.1f} | {r['flow_params_M']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
