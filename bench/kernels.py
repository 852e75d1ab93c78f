"""Benchmark the Triton ops in ``kernels`` against PyTorch at CrossFlow shapes.

    python bench/kernels.py                 # on a CUDA machine: prints a markdown table
    python bench/kernels.py --dtype float16 --ops attention
    python bench/kernels.py --smoke         # CPU, TRITON_INTERPRET=1, tiny shapes: checks the
                                            # script itself; the numbers mean nothing

Without a CUDA device (and without --smoke) it prints "no CUDA device: nothing measured" and
exits 0. Timings: triton.testing.do_bench, median over ~100 ms of repetitions.

Attention (B=32, H in {16, 20}, N in {257, 1025}, D in {64, 128}, no padding): Triton vs SDPA
with the flash backend pinned (torch.nn.attention.sdpa_kernel) and with the math backend.
FLOPs: forward 4 B H N^2 D, backward 2.5x that (two matmuls in the forward, five in the
backward). The other ops are memory-bound: GB/s counts the bytes an ideal fused kernel must
move (same count for every implementation, so it is a normalized inverse time). "peak MiB" is
torch.cuda.max_memory_allocated during one forward+backward, above the inputs.
In training z1 (the image latent) is frozen and z0 (the text latent) is not; the benchmark
does the same.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# This file is bench/kernels.py: keep its folder off sys.path so `import kernels` finds the package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class Row:
    op: str
    shape: str
    impl: str
    mode: str
    ms: float | None
    rate: float | None  # TFLOP/s (attention) or GB/s (others)
    unit: str
    peak_mib: float | None = None


# ----------------------------------------------------------------------------- timing
def gpu_timer(fn: Callable[[], object], grad_to_none) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def wall_timer(fn: Callable[[], object], grad_to_none) -> float:
    """--smoke: one call after one warm-up, wall clock (the interpreter is far too slow to repeat)."""
    fn()
    for t in grad_to_none or ():
        t.grad = None
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def peak_mib(fn: Callable, inputs: list[torch.Tensor], dout: torch.Tensor) -> float | None:
    if inputs[0].device.type != "cuda":
        return None
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*inputs).backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in inputs:
        t.grad = None
    return peak / 2**20


def measure(fn: Callable, make_inputs: Callable[[], list[torch.Tensor]], timer) -> dict[str, float | None]:
    """ms for fwd, bwd, fwd+bwd and the fwd+bwd peak memory of fn(*inputs)."""
    inputs = make_inputs()
    leaves = [t for t in inputs if t.requires_grad]
    out = fn(*inputs)
    dout = torch.randn_like(out)
    result: dict[str, float | None] = {}
    result["fwd"] = timer(lambda: fn(*inputs), None)
    result["bwd"] = timer(lambda: out.backward(dout, retain_graph=True), leaves)
    result["fwd+bwd"] = timer(lambda: fn(*inputs).backward(dout), leaves)
    del out
    result["peak"] = peak_mib(fn, inputs, dout)
    return result


# ----------------------------------------------------------------------------- attention
def sdpa_with(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def bench_attention(shapes, dtype, device, timer, impls) -> list[Row]:
    rows = []
    for B, H, N, D in shapes:
        def make(B=B, H=H, N=N, D=D):
            return [torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3)]
        flops_fwd = 4.0 * B * H * N * N * D
        flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}
        for name, fn in impls.items():
            try:
                res = measure(fn, make, timer)
            except RuntimeError as err:  # e.g. flash SDPA has no fp32 kernel
                print(f"attention {name} B={B} H={H} N={N} D={D}: skipped ({str(err).splitlines()[0][:100]})",
                      file=sys.stderr)
                continue
            for mode in MODES:
                ms = res[mode]
                rows.append(Row("attention", f"B{B} H{H} N{N} D{D}", name, mode, ms,
                                flops[mode] / (ms * 1e-3) / 1e12, "TFLOP/s",
                                res["peak"] if mode == "fwd+bwd" else None))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- memory-bound ops
def bench_memory_bound(op: str, cases, impls, timer) -> list[Row]:
    """cases: (shape label, make_inputs, {mode: ideal bytes})."""
    rows = []
    for label, make, nbytes in cases:
        for name, fn in impls.items():
            res = measure(fn, make, timer)
            for mode in MODES:
                ms = res[mode]
                rows.append(Row(op, label, name, mode, ms, nbytes[mode] / (ms * 1e-3) / 1e9, "GB/s",
                                res["peak"] if mode == "fwd+bwd" else None))
    return rows


def latent_cases(latents, dtype, device, op: str):
    cases = []
    for shape in latents:
        E = torch.Size(shape).numel()
        s = torch.tensor([], dtype=dtype).element_size()
        label = "x".join(map(str, shape))
        if op == "flow_matching_loss":
            # fwd: read v, z0, z1; bwd: read v, z0, z1, write dv, dz0 (z1 frozen)
            nbytes = {"fwd": 3 * E * s, "bwd": 5 * E * s}

            def make(shape=shape):
                v, z0 = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
                return [v, z0, torch.randn(shape, device=device, dtype=dtype)]
        else:  # interpolate: fwd read z0, z1, write x; bwd read dx, write dz0 (z1 frozen, t sampled)
            nbytes = {"fwd": 3 * E * s, "bwd": 2 * E * s}

            def make(shape=shape):
                z0 = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                return [z0, torch.randn(shape, device=device, dtype=dtype), torch.rand(shape[0], device=device)]
        nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]
        cases.append((label, make, nbytes))
    return cases


def token_cases(token_shapes, dtype, device, op: str):
    cases = []
    for B, N, D in token_shapes:
        E = B * N * D
        s = torch.tensor([], dtype=dtype).element_size()
        if op == "modulate":  # fwd: read x, write y; bwd: read x, dy, write dx
            nbytes = {"fwd": 2 * E * s, "bwd": 3 * E * s}

            def make(B=B, N=N, D=D):
                return [torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True),
                        *(torch.randn(B, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))]
        else:  # gated_residual: fwd read x, y, write out; bwd read dout, y, write dy (dx = dout)
            nbytes = {"fwd": 3 * E * s, "bwd": 3 * E * s}

            def make(B=B, N=N, D=D):
                return [torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True),
                        torch.randn(B, D, device=device, dtype=dtype, requires_grad=True),
                        torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True)]
        nbytes["fwd+bwd"] = nbytes["fwd"] + nbytes["bwd"]
        cases.append((f"B{B} N{N} D{D}", make, nbytes))
    return cases


# ----------------------------------------------------------------------------- table
def markdown(rows: list[Row]) -> str:
    lines = ["| op | shape | impl | mode | ms | rate | peak MiB (fwd+bwd) |",
             "|---|---|---|---|---:|---:|---:|"]
    for r in rows:
        ms = f"{r.ms:.3f}" if r.ms is not None else "n/a"
        rate = f"{r.rate:.1f} {r.unit}" if r.rate is not None else "n/a"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else ""
        lines.append(f"| {r.op} | {r.shape} | {r.impl} | {r.mode} | {ms} | {rate} | {peak} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", nargs="+", default=["attention", "flow_matching_loss", "interpolate",
                                                "modulate", "gated_residual"])
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the references of the memory-bound ops")
    p.add_argument("--smoke", action="store_true",
                   help="CPU under TRITON_INTERPRET=1 with tiny shapes: exercises this script, measures nothing")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the op modules are imported
        device, timer = torch.device("cpu"), wall_timer
        dtype = torch.float32 if args.dtype == "bfloat16" else getattr(torch, args.dtype)  # bf16 is wrong there
        att_shapes, latents, tokens = [(1, 2, 65, 64)], [(2, 4, 8, 8)], [(2, 17, 128)]
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing measured (bench/kernels.py times the Triton ops on a GPU; "
              "run it on a CUDA machine, or with --smoke to exercise the script on CPU)")
        return 0
    else:
        device, timer, dtype = torch.device("cuda"), gpu_timer, getattr(torch, args.dtype)
        att_shapes = [(32, H, N, D) for D in (64, 128) for H in (16, 20) for N in (257, 1025)]
        latents = [(32, 4, 32, 32), (32, 4, 64, 64), (32, 16, 32, 32)]
        tokens = [(32, N, H * D) for D in (64, 128) for H in (16, 20) for N in (257, 1025)]

    from kernels import reference
    from kernels.attention import attention
    from kernels.flow_loss import flow_matching_loss, interpolate
    from kernels.modulation import gated_residual, modulate

    def with_compiled(ref):
        impls = {"torch eager": ref}
        if args.compile:
            impls["torch.compile"] = torch.compile(ref)
        return impls

    rows: list[Row] = []
    if "attention" in args.ops:
        impls = {"triton": attention, "sdpa-flash": sdpa_with("FLASH_ATTENTION"), "sdpa-math": sdpa_with("MATH")}
        if args.smoke:
            impls = {"triton": attention, "sdpa-math": sdpa_with("MATH")}
        rows += bench_attention(att_shapes, dtype, device, timer, impls)
    for op, triton_fn, cases in (
            ("flow_matching_loss", flow_matching_loss, latent_cases(latents, dtype, device, "flow_matching_loss")),
            ("interpolate", interpolate, latent_cases(latents, dtype, device, "interpolate")),
            ("modulate", modulate, token_cases(tokens, dtype, device, "modulate")),
            ("gated_residual", gated_residual, token_cases(tokens, dtype, device, "gated_residual"))):
        if op in args.ops:
            rows += bench_memory_bound(op, cases, {"triton": triton_fn, **with_compiled(getattr(reference, op))}, timer)

    if device.type == "cuda":
        import triton
        header = (f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
                  f"dtype {dtype}; median of triton.testing.do_bench")
    else:
        header = f"--smoke on CPU under TRITON_INTERPRET=1, dtype {dtype}: NOT a measurement"
    print(header + "\n\n" + markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
