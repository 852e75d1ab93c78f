"""Training-step benchmark: images/s, MFU and peak memory of the real engine on one device.

    python bench/train_step.py                                   # CPU: tiny preset, one setting
    python bench/train_step.py --preset 0.95B --batches 32,64,128,192,256 --ac both \\
        --compile off --kernels triton,torch --out results/      # GPU sweep
    python bench/train_step.py --preset 0.95B --batches 128 --profile --out results/

Runs the engine users train with (DeepSpeed ZeRO, one process, bf16 autocast on GPU, EMA) on
synthetic batches of the preset's paper shapes: latent 4x32x32 (256 px through the SD VAE) and
77 text tokens of width 768; the tiny preset uses 3x32x32 pixels and 16 tokens of width 384.
Each step draws its noise, runs ``crossflow_losses`` (Text VE + flow transformer), backward and
the optimizer step with the EMA update, like ``trainer.loop``.

Each (kernels, activation checkpointing, compile) setting runs in its own process, which sweeps
the micro-batches in ascending order and stops at the first out-of-memory. Timing: ``--warmup``
steps, then ``--steps`` steps back to back with one synchronization at each end (the loop's
own rhythm); step time = window / steps. MFU = ``CrossFlow.flops_per_sample`` (flow transformer
training FLOPs) x images/s over ``--peak-tflops`` (989 = H100 SXM dense bf16). Peak memory:
``torch.cuda.max_memory_allocated`` and ``max_memory_reserved`` over the batch's steps (stats
reset before its warm-up; parameters, gradients, optimizer state and EMA included).

``--profile``: one extra process runs the first setting at the first batch under
torch.profiler and prints where the GPU time goes (attention, matmuls, norms and modulation,
optimizer and EMA, other), plus CUDA-event times of forward, backward and optimizer step, and the
part of the step the GPU sat idle (host overhead). ``--out DIR`` writes every row as JSON lines
(``train_step.jsonl``) and the profile's top kernels (``profile.txt``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_H100_BF16 = 989.0  # TFLOP/s, dense bf16, H100 SXM datasheet
_PHASES = ("forward", "backward", "optimizer")


def shapes_for(preset: str) -> tuple[tuple[int, int, int], int, int]:
    """(latent shape, text tokens, text width) of the preset's paper setting."""
    if preset == "tiny":
        return (3, 32, 32), 16, 384
    return (4, 32, 32), 77, 768


# ----------------------------------------------------------------------------- one setting
def build(preset: str, kernels: str, precision: str, zero: int, ac: bool, compile_: bool, micro_batch: int):
    """The model and engine exactly as ``trainer.loop`` builds them (without its data and logging),
    with the ops it would use. Imports only what the step needs (no data, Ray, W&B)."""
    from kernels import compose_ops, get_ops
    from trainer.config import Config, ModelConfig
    from trainer.engine import Engine, init_distributed
    from trainer.models.families import model_from_args, resolve_model_args

    cfg = Config()
    mixed = "=" in kernels  # "attention=cudnn+modulate=triton": ops picked one by one (bench only)
    cfg.model = ModelConfig(preset=preset, kernels="torch" if mixed else kernels)
    latent, tokens, text_dim = shapes_for(preset)
    cfg.data.max_tokens = tokens
    cfg.train.global_batch_size = micro_batch
    cfg.train.precision = precision
    cfg.train.zero_stage = zero
    cfg.train.activation_checkpointing = ac
    cfg.train.compile = compile_
    cfg.optim.warmup_steps = 0
    info = init_distributed("auto")
    torch.manual_seed(0)
    args = resolve_model_args(cfg.model, latent, text_dim, tokens, cfg.objective.contrastive_init_temperature,
                              cfg.objective.contrastive)
    with info.device:  # initialize on the device: seconds instead of a minute for 1B parameters on CPU
        model = model_from_args(args)
    if mixed:
        ops = compose_ops(dict(item.split("=") for item in kernels.split("+")), info.device, backend="mixed")
    else:
        ops = get_ops(kernels, info.device)
    model.set_ops(ops)
    model.to(info.device)
    engine = Engine(model, cfg.train, cfg.optim, micro_batch, info)
    return cfg, engine, ops, info.device


def synthetic_batch(preset: str, batch: int, device: torch.device):
    latent, tokens, text_dim = shapes_for(preset)
    z1 = torch.randn(batch, *latent, device=device)  # (B, C, H, W) image latents
    emb = torch.randn(batch, tokens, text_dim, device=device)  # (B, T, text_dim)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)  # (B, T)
    mask[:, tokens * 3 // 4:] = torch.rand(batch, 1, device=device) < 0.5  # some captions padded
    return z1, emb, mask


def train_step(cfg, engine, ops, batch_data, step: int, events=None):
    """One optimizer step as the loop runs it. ``events``: 4 CUDA events recorded between the
    phases (forward, backward, optimizer step + EMA)."""
    from trainer.objectives import crossflow_losses, draw_noise

    z1, emb, mask = batch_data
    latent = tuple(z1.shape[1:])
    noise = draw_noise(cfg.objective, 0, step, 0, z1.shape[0], 0, 1, latent, z1.device)
    if events:
        events[0].record()
    with engine.autocast():
        losses = crossflow_losses(engine.module, z1, emb, mask, cfg.objective, ops, noise)
    if events:
        events[1].record()
    engine.backward(losses.total)
    if events:
        events[2].record()
    engine.step()
    if events:
        events[3].record()
    return losses.total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_batch(cfg, engine, ops, device, preset: str, batch: int, warmup: int, steps: int) -> dict:
    data = synthetic_batch(preset, batch, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup):
        train_step(cfg, engine, ops, data, i)
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        loss = train_step(cfg, engine, ops, data, warmup + i)
    sync(device)
    step_s = (time.perf_counter() - start) / steps
    row = {"micro_batch": batch, "step_s": step_s, "images_s": batch / step_s, "loss": float(loss)}
    if device.type == "cuda":
        row["allocated_after_step_GiB"] = torch.cuda.memory_allocated(device) / 2**30  # weights + optimizer + EMA
        row["max_allocated_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["max_reserved_GiB"] = torch.cuda.max_memory_reserved(device) / 2**30
    return row


def worker(args) -> int:
    """One setting, every batch ascending; prints one JSON line per batch (``ROW {...}``)."""
    kernels, ac, compile_ = args.kernels, args.ac == "on", args.compile == "on"
    batches = [int(b) for b in args.batches.split(",")]
    cfg, engine, ops, device = build(args.preset, kernels, args.precision, args.zero, ac, compile_, batches[0])
    module = engine.module
    flops = module.flops_per_sample()
    peak = (args.peak_tflops or (PEAK_H100_BF16 if device.type == "cuda" else 0.0)) * 1e12
    base = {"preset": args.preset, "kernels": kernels, "resolved_ops": ops.implementations, "ac": ac,
            "compile": compile_, "zero": args.zero, "world_size": 1, "precision": args.precision,
            "flow_params_M": module.flow_params() / 1e6, "params_M": sum(p.numel() for p in module.parameters()) / 1e6,
            "flops_per_sample": flops}
    if device.type == "cuda":
        base["allocated_after_init_GiB"] = torch.cuda.memory_allocated(device) / 2**30
        base["device_total_GiB"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    if args.profile:
        print("PROFILE " + json.dumps({**base, **profile(cfg, engine, ops, device, args, batches[0])}), flush=True)
        return 0
    for batch in batches:
        try:
            row = measure_batch(cfg, engine, ops, device, args.preset, batch, args.warmup, args.steps)
        except torch.OutOfMemoryError as err:
            print("ROW " + json.dumps({**base, "micro_batch": batch, "oom": str(err).splitlines()[0][:160]}), flush=True)
            return 0
        row["mfu"] = flops * row["images_s"] / peak if peak else None
        row["model_tflops"] = flops * row["images_s"] / 1e12
        print("ROW " + json.dumps({**base, **row}), flush=True)
    return 0


# ----------------------------------------------------------------------------- profile
# Kernel name fragments (lower case) -> category, first match wins.
CATEGORIES = (
    ("attention", ("_attn_", "flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "wgmma", "matmul", "sm90_")),
    ("norm + modulation", ("layer_norm", "layernorm", "_modulate", "_gated_residual", "norm")),
    ("optimizer + EMA", ("adam", "multi_tensor", "foreach", "lerp")),
    ("loss + interpolate", ("_fm_loss", "_interp")),
)


def categorize(name: str) -> str:
    low = name.lower()
    for category, keys in CATEGORIES:
        if any(k in low for k in keys):
            return category
    return "other (elementwise, copies, reductions)"


def profile(cfg, engine, ops, device, args, batch: int) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    data = synthetic_batch(args.preset, batch, device)
    for i in range(args.warmup):
        train_step(cfg, engine, ops, data, i)
    sync(device)
    n = 3
    phase_ms = {p: 0.0 for p in _PHASES}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for i in range(n):
            if device.type == "cuda":
                events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                train_step(cfg, engine, ops, data, 100 + i, events)
                sync(device)
                for p, (a, b) in zip(_PHASES, itertools.pairwise(events)):
                    phase_ms[p] += a.elapsed_time(b) / n
            else:
                train_step(cfg, engine, ops, data, 100 + i)
        sync(device)
        wall_ms = (time.perf_counter() - start) * 1e3 / n
    kernel_us: dict[str, float] = {}
    by_category: dict[str, float] = {}
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0.0)
        kernel_us[evt.key] = kernel_us.get(evt.key, 0.0) + us
        by_category[categorize(evt.key)] = by_category.get(categorize(evt.key), 0.0) + us / 1e3 / n
    gpu_ms = sum(by_category.values())
    top = sorted(kernel_us.items(), key=lambda kv: -kv[1])[:25]
    if args.out:
        lines = [f"{us / 1e3 / n:9.3f} ms/step  {categorize(k):<40} {k}" for k, us in top]
        (Path(args.out) / "profile.txt").write_text("\n".join(lines) + "\n")
    return {"micro_batch": batch, "profiled_steps": n, "wall_ms_per_step": wall_ms, "gpu_kernel_ms_per_step": gpu_ms,
            "gpu_idle_ms_per_step": wall_ms - gpu_ms, "category_ms": by_category, "phase_ms": phase_ms,
            "top_kernels_ms": {k: us / 1e3 / n for k, us in top[:10]}}


# ----------------------------------------------------------------------------- driver
def settings(args):
    def both(x):
        return ["off", "on"] if x == "both" else [x]
    return [(k, ac, c) for k in args.kernels.split(",") for ac in both(args.ac) for c in both(args.compile)]


def run_setting(args, kernels: str, ac: str, compile_: str, profile_: bool = False) -> list[dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--preset", args.preset,
           "--batches", args.batches, "--precision", args.precision, "--zero", str(args.zero),
           "--kernels", kernels, "--ac", ac, "--compile", compile_, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--peak-tflops", str(args.peak_tflops)]
    if profile_:
        cmd += ["--profile"] + (["--out", args.out] if args.out else [])
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.setting_timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err, rc = f"timed out after {args.setting_timeout} s", -1
    rows = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith(("ROW ", "PROFILE "))]
    for r in rows:
        r["setting_wall_s"] = time.perf_counter() - started
    if rc != 0:
        tail = "\n".join(err.strip().splitlines()[-15:])
        print(f"setting kernels={kernels} ac={ac} compile={compile_} failed (rc {rc}):\n{tail}", file=sys.stderr)
        rows.append({"kernels": kernels, "ac": ac == "on", "compile": compile_ == "on", "error": tail[-400:]})
    return rows


def fmt(x, spec: str) -> str:
    return format(x, spec) if isinstance(x, (int, float)) else "-"


def table(rows: list[dict]) -> str:
    lines = ["| kernels | act. ckpt | compile | micro-batch | step (s) | images/s | model TFLOP/s | MFU | "
             "max allocated (GiB) | max reserved (GiB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kernels']} | {r['ac']} | {r['compile']} | error: {r['error'][-120:]} |||||||")
            continue
        if "oom" in r:
            lines.append(f"| {r['kernels']} | {r['ac']} | {r['compile']} | {r['micro_batch']} | OOM |||||||")
            continue
        lines.append(f"| {r['kernels']} | {r['ac']} | {r['compile']} | {r['micro_batch']} | {fmt(r['step_s'], '.4f')} | "
                     f"{fmt(r['images_s'], '.1f')} | {fmt(r.get('model_tflops'), '.1f')} | {fmt(r.get('mfu'), '.3f')} | "
                     f"{fmt(r.get('max_allocated_GiB'), '.2f')} | {fmt(r.get('max_reserved_GiB'), '.2f')} |")
    return "\n".join(lines)


def profile_table(p: dict) -> str:
    wall = p["wall_ms_per_step"]
    lines = [f"profile: kernels {p['kernels']}, ac {p['ac']}, compile {p['compile']}, micro-batch {p['micro_batch']}: "
             f"{wall:.1f} ms per step (under the profiler), GPU kernels {p['gpu_kernel_ms_per_step']:.1f} ms",
             "| where | ms/step | share of step |", "|---|---:|---:|"]
    for cat, ms in sorted(p["category_ms"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {cat} | {ms:.1f} | {ms / wall:.1%} |")
    lines.append(f"| GPU idle (host, launches, syncs) | {p['gpu_idle_ms_per_step']:.1f} | "
                 f"{p['gpu_idle_ms_per_step'] / wall:.1%} |")
    lines.append("phases (CUDA events): " + ", ".join(f"{k} {v:.1f} ms" for k, v in p["phase_ms"].items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batches", default="8", help="comma-separated micro-batches, swept ascending per setting")
    p.add_argument("--precision", default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--kernels", default="auto",
                   help="comma-separated model.kernels values to compare; a value like "
                        "attention=cudnn+modulate=triton picks ops one by one (others: torch)")
    p.add_argument("--ac", default="off", choices=["off", "on", "both"], help="activation checkpointing")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"], help="torch.compile of the blocks")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0, help="0 = 989 on CUDA, no MFU on CPU")
    p.add_argument("--profile", action="store_true", help="profile the first setting at the first batch")
    p.add_argument("--no-sweep", action="store_true", help="with --profile: only the profile")
    p.add_argument("--out", default="", help="folder for train_step.jsonl and profile.txt")
    p.add_argument("--setting-timeout", type=float, default=480.0, help="seconds per setting's process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.batches = ",".join(str(b) for b in sorted(int(b) for b in args.batches.split(",")))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device}; torch {torch.__version__}; preset {args.preset}, {args.precision}, "
          f"ZeRO-{args.zero}, world size 1; {args.warmup} warm-up + {args.steps} timed steps per batch", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if not (args.profile and args.no_sweep):
        for kernels, ac, compile_ in settings(args):
            new = run_setting(args, kernels, ac, compile_)
            rows += new
            for r in new:
                print(json.dumps(r), flush=True)
    prof = None
    if args.profile:
        kernels, ac, compile_ = settings(args)[0]
        got = run_setting(args, kernels, ac, compile_, profile_=True)
        prof = next((r for r in got if "category_ms" in r), None)
        rows += [r for r in got if "error" in r]
    if args.out:
        with open(Path(args.out) / "train_step.jsonl", "a") as f:
            for r in rows + ([prof] if prof else []):
                f.write(json.dumps(r) + "\n")
    print("\n" + table(rows))
    if prof:
        print("\n" + profile_table(prof))
    return 0


if __name__ == "__main__":
    sys.exit(main())
