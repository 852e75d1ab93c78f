"""Benchmark the Triton ops in ``kernels`` against PyTorch at CrossFlow shapes.

    python bench/kernels.py                 # on a CUDA machine: prints markdown tables
    python bench/kernels.py --ops attention --batches 32 --out results/
    python bench/kernels.py --smoke         # CPU, TRITON_INTERPRET=1, tiny shapes: checks the
                                            # script itself; the numbers mean nothing

    python bench/kernels.py --write-table   # also record the results for model.kernels: auto
                                            # in kernels/auto_table.json (this device's class)

Without a CUDA device (and without --smoke) it prints "no CUDA device: nothing measured" and
exits 0. Timings: triton.testing.do_bench, median over ~100 ms of repetitions.

Attention, B in {32, 64}, heads of the 0.95B width (1536 = H x D): N = 257 with D = 128 (the
0.95B preset at 256 px), N = 1025 with D = 64 and 128 (512 px). Inputs are laid out as the model
makes them: views of one (B, N, 3, H, D) qkv tensor (the gradient lands in it). Ours against
every SDPA backend the device offers (flash, cuDNN, memory-efficient; pinned with
torch.nn.attention.sdpa_kernel). FLOPs: forward 4 B H N^2 D, backward 2.5x that.
The other ops are memory-bound: GB/s counts the bytes an ideal fused kernel must move (same
count for every implementation, so it is a normalized inverse time), against eager PyTorch and
torch.compile of the same reference (``--no-compile`` skips it). "peak MiB" is
torch.cuda.max_memory_allocated during one forward+backward, above the inputs.
In training z1 (the image latent) is frozen and z0 (the text latent) is not; the benchmark
does the same. The last table gives, per op and shape, ours against the fastest other
implementation (forward+backward): the figures behind ``model.kernels: auto``.

--write-table also checks, per op and shape, that the Triton op's output and every gradient match
the PyTorch reference run in fp32 on the same inputs (max error over max magnitude within
``CORRECT_WITHIN`` for the dtype), and writes one row per op and shape (fwd+bwd ms of every
implementation, CUDA-graph time where measured, whether Triton was correct, which was fastest) as
the entry of this device's class in the table (``kernels.auto_table``), with the command, date and
git commit; the other classes' entries stay as they are.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
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
    rate: float | None  # TFLOP/s (attention) or GB/s (others), from graph_ms when measured
    unit: str
    peak_mib: float | None = None
    graph_ms: float | None = None  # CUDA-graph replay: GPU time without the host's launch overhead
    tokens: int | None = None  # sequence length (attention, modulate, gated_residual)
    width: int | None = None  # head dim (attention) or hidden width (modulate, gated_residual)
    triton_correct: bool | None = None  # triton rows under --write-table: output and gradients match


# Largest max|ours - reference| / max|reference| accepted, output and each gradient, against the
# reference run in fp32 on the same inputs (the looser ends of tests/kernels' tolerance tables).
CORRECT_WITHIN = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def make_row(op, shape, impl, mode, res, work: float, scale: float, unit: str, **where) -> Row:
    """work: FLOPs or bytes of the mode; scale: 1e12 (TFLOP/s) or 1e9 (GB/s); where: tokens, width."""
    ms, graph_ms = res[mode], res.get("graph " + mode)
    best = graph_ms if graph_ms is not None else ms
    return Row(op, shape, impl, mode, ms, work / (best * 1e-3) / scale, unit,
               res["peak"] if mode == "fwd+bwd" else None, graph_ms, **where)


def matches_reference(fn: Callable, ref: Callable, make_inputs: Callable[[], list[torch.Tensor]]) -> bool:
    """fn's output and every input gradient against ref's on fp32 copies of the same inputs."""
    inputs = make_inputs()
    ref_inputs = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    out = fn(*inputs)
    dout = torch.randn_like(out)
    out.backward(dout)
    expected = ref(*ref_inputs)
    expected.backward(dout.float())
    pairs = [(out, expected)] + [(a.grad, b.grad) for a, b in zip(inputs, ref_inputs) if a.requires_grad]
    within = CORRECT_WITHIN[inputs[0].dtype]
    return all(bool((a.float() - b).abs().max() <= within * b.abs().max().clamp_min(1e-6)) for a, b in pairs)


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
    if inputs[0].device.type == "cuda":
        try:
            result["graph fwd"] = graph_time(lambda: fn(*inputs), [])
            result["graph fwd+bwd"] = graph_time(lambda: fn(*inputs).backward(dout), leaves)
            result["graph bwd"] = result["graph fwd+bwd"] - result["graph fwd"]
        except RuntimeError as err:  # a kernel that cannot be captured: launch timings only
            print(f"CUDA graph capture failed: {str(err).splitlines()[0][:160]}", file=sys.stderr)
            torch.cuda.synchronize()
    return result


def graph_time(fn: Callable[[], object], leaves: list[torch.Tensor]) -> float:
    """Median ms of replaying one CUDA graph of fn: the GPU time, launch overhead excluded (the
    training step runs ahead of the GPU, so this is what its kernels cost there). The backward
    is captured together with its forward, so 'bwd' is reported as (fwd+bwd) - fwd."""
    import triton.testing
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
            for t in leaves:
                t.grad = None
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for t in leaves:
        t.grad = None
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms


# ----------------------------------------------------------------------------- attention
SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}


def sdpa_with(backend_name: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def on_qkv(attn: Callable) -> Callable:
    """attn(q, k, v) applied to views of one (B, N, 3, H, D) tensor, as the model calls it."""
    def run(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, N, D) each, strided
        return attn(q, k, v)
    return run


def bench_attention(shapes, dtype, device, timer, impls, check: bool = False) -> list[Row]:
    """check: also test the Triton op ("triton" in impls) against the reference (--write-table)."""
    from kernels import reference
    rows = []
    for B, H, N, D in shapes:
        def make(B=B, H=H, N=N, D=D):
            return [torch.randn(B, N, 3, H, D, device=device, dtype=dtype, requires_grad=True)]
        flops_fwd = 4.0 * B * H * N * N * D
        flops = {"fwd": flops_fwd, "bwd": 2.5 * flops_fwd, "fwd+bwd": 3.5 * flops_fwd}
        for name, fn in impls.items():
            try:
                res = measure(on_qkv(fn), make, timer)
            except RuntimeError as err:  # a backend without a kernel for this shape or dtype
                print(f"attention {name} B={B} H={H} N={N} D={D}: skipped ({str(err).splitlines()[0][:100]})",
                      file=sys.stderr)
                continue
            correct = matches_reference(on_qkv(fn), on_qkv(reference.attention), make) \
                if check and name == "triton" else None
            for mode in MODES:
                rows.append(make_row("attention", f"B{B} H{H} N{N} D{D}", name, mode, res, flops[mode], 1e12,
                                     "TFLOP/s", tokens=N, width=D, triton_correct=correct))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- memory-bound ops
def bench_memory_bound(op: str, cases, impls, timer, check: bool = False) -> list[Row]:
    """cases: (shape label, make_inputs, {mode: ideal bytes}, {tokens, width}); check: also test
    impls["triton"] against impls["torch eager"] (the reference) for --write-table."""
    rows = []
    for label, make, nbytes, where in cases:
        for name, fn in impls.items():
            res = measure(fn, make, timer)
            correct = matches_reference(fn, impls["torch eager"], make) if check and name == "triton" else None
            for mode in MODES:
                rows.append(make_row(op, label, name, mode, res, nbytes[mode], 1e9, "GB/s", triton_correct=correct,
                                     **where))
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
        cases.append((label, make, nbytes, {"tokens": None, "width": None}))
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
        cases.append((f"B{B} N{N} D{D}", make, nbytes, {"tokens": N, "width": D}))
    return cases


# ----------------------------------------------------------------------------- tables
def markdown(rows: list[Row]) -> str:
    lines = ["| op | shape | impl | mode | ms (launched) | ms (graph) | rate | peak MiB (fwd+bwd) |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ms = f"{r.ms:.4f}" if r.ms is not None else "n/a"
        graph_ms = f"{r.graph_ms:.4f}" if r.graph_ms is not None else "n/a"
        rate = f"{r.rate:.1f} {r.unit}" if r.rate is not None else "n/a"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else ""
        lines.append(f"| {r.op} | {r.shape} | {r.impl} | {r.mode} | {ms} | {graph_ms} | {rate} | {peak} |")
    return "\n".join(lines)


def summary(rows: list[Row], ours: str = "triton") -> str:
    """Per op and shape, forward+backward: ours against the fastest other implementation
    (CUDA-graph times where measured, else launched times)."""
    lines = ["| op | shape | ours fwd+bwd | fastest other | its fwd+bwd | speed-up (other / ours) | "
             "peak MiB ours / other |", "|---|---|---:|---|---:|---:|---:|"]
    cases: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.mode == "fwd+bwd":
            cases.setdefault((r.op, r.shape), {})[r.impl] = r
    for (op, shape), impls in cases.items():
        mine = impls.get(ours)
        others = [r for name, r in impls.items() if name != ours]
        if mine is None or not others:
            continue
        def t(r):
            return r.graph_ms if r.graph_ms is not None else r.ms
        best = min(others, key=t)
        peaks = f"{mine.peak_mib:.0f} / {best.peak_mib:.0f}" if mine.peak_mib is not None else "n/a"
        rate = f" ({mine.rate:.0f} vs {best.rate:.0f} {mine.unit})"
        lines.append(f"| {op} | {shape} | {t(mine):.4f} ms | {best.impl} | {t(best):.4f} ms | "
                     f"{t(best) / t(mine):.2f}x{rate} | {peaks} |")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--ops", nargs="+", default=["attention", "flow_matching_loss", "interpolate",
                                                "modulate", "gated_residual"])
    p.add_argument("--batches", default="32,64", help="comma-separated batch sizes (GPU)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile of the references of the memory-bound ops")
    p.add_argument("--out", default="", help="folder for kernels.jsonl (every row)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU under TRITON_INTERPRET=1 with tiny shapes: exercises this script, measures nothing")
    p.add_argument("--write-table", action="store_true",
                   help="check Triton against the reference and write this device class's entry of the "
                        "model.kernels: auto table (kernels/auto_table.json, or --table)")
    p.add_argument("--table", default="", help="the table --write-table updates (default: the one "
                                               "kernels.auto_table reads; required with --smoke)")
    args = p.parse_args(argv)
    if args.write_table and args.smoke and not args.table:
        p.error("--smoke measures nothing: --write-table --smoke needs --table PATH (not the shipped table)")
    return args


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=_HERE.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"


def table_entry(rows: list[Row], device_name: str, command: str, timing: str) -> dict:
    """This run's entry of the auto table: per op and shape, fwd+bwd ms of each implementation."""
    import triton

    from kernels import auto_table
    cases: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        if r.mode == "fwd+bwd":
            cases.setdefault((r.op, r.shape), {})[r.impl] = r
    measurements = []
    for (op, shape), impls in cases.items():
        mine = impls.get("triton")
        if mine is None or len(impls) < 2:
            continue
        ms = {name: r.graph_ms if r.graph_ms is not None else r.ms for name, r in impls.items()}
        measurements.append(auto_table.measurement(op, DTYPE_NAME, shape, mine.tokens, mine.width, ms,
                                                   bool(mine.triton_correct)))
    source = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
              "commit": git_commit(), "device_name": device_name, "torch": torch.__version__,
              "triton": triton.__version__, "timing": timing}
    return {"device_name": device_name, "source": source, "measurements": measurements}


def compiled(ref: Callable) -> Callable:
    """torch.compile of a reference, one static graph per shape (no dynamic-shape kernels)."""
    import torch._dynamo.config as dynamo_config
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 64)
    return torch.compile(ref, dynamic=False)


DTYPE_NAME = ""  # the run's dtype as the table names it ("bfloat16", ...), set by main


def main(argv: list[str] | None = None) -> int:
    global DTYPE_NAME
    args = parse_args(argv)
    args.command = " ".join(["python bench/kernels.py", *(sys.argv[1:] if argv is None else argv)])
    width = 1536  # the 0.95B preset's hidden size: H = width / D
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the op modules are imported
        device, timer = torch.device("cpu"), wall_timer
        dtype = torch.float32 if args.dtype == "bfloat16" else getattr(torch, args.dtype)  # bf16 is wrong there
        att_shapes, latents, tokens = [(1, 2, 65, 64)], [(2, 4, 8, 8)], [(2, 17, 128)]
        args.no_compile = True  # inductor on CPU would only add minutes
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing measured (bench/kernels.py times the Triton ops on a GPU; "
              "run it on a CUDA machine, or with --smoke to exercise the script on CPU)")
        return 0
    else:
        device, timer, dtype = torch.device("cuda"), gpu_timer, getattr(torch, args.dtype)
        batches = [int(b) for b in args.batches.split(",")]
        att_shapes = [(B, width // D, N, D) for B in batches for N, D in ((257, 128), (1025, 64), (1025, 128))]
        latents = [(B, 4, 32, 32) for B in batches] + [(B, 4, 64, 64) for B in batches]
        tokens = [(B, N, width) for B in batches for N in (257, 1025)]

    DTYPE_NAME = str(dtype).removeprefix("torch.")
    from kernels import reference
    from kernels.attention import attention
    from kernels.flow_loss import flow_matching_loss, interpolate
    from kernels.modulation import gated_residual, modulate

    def with_compiled(ref):
        impls = {"torch eager": ref}
        if not args.no_compile:
            impls["torch.compile"] = compiled(ref)
        return impls

    rows: list[Row] = []
    if "attention" in args.ops:
        backends = ("sdpa-math",) if args.smoke else ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")
        impls = {"triton": attention, **{name: sdpa_with(SDPA_BACKENDS[name]) for name in backends},
                 "sdpa-default": reference.attention}  # PyTorch's own backend choice: model.kernels torch
        rows += bench_attention(att_shapes, dtype, device, timer, impls, check=args.write_table)
    for op, triton_fn, cases in (
            ("flow_matching_loss", flow_matching_loss, latent_cases(latents, dtype, device, "flow_matching_loss")),
            ("interpolate", interpolate, latent_cases(latents, dtype, device, "interpolate")),
            ("modulate", modulate, token_cases(tokens, dtype, device, "modulate")),
            ("gated_residual", gated_residual, token_cases(tokens, dtype, device, "gated_residual"))):
        if op in args.ops:
            rows += bench_memory_bound(op, cases, {"triton": triton_fn, **with_compiled(getattr(reference, op))}, timer,
                                       check=args.write_table)

    if device.type == "cuda":
        import triton
        header = (f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}, triton {triton.__version__}; "
                  f"dtype {dtype}; median of triton.testing.do_bench")
    else:
        header = f"--smoke on CPU under TRITON_INTERPRET=1, dtype {dtype}: NOT a measurement"
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out) / "kernels.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    from kernels.attention import tuned_configs
    tuned = "\n".join(f"{kernel} {key}: {config}" for kernel, chosen in tuned_configs().items()
                      for key, config in chosen.items())
    print(header + "\n\nautotuned attention configs:\n" + tuned + "\n\n" + markdown(rows) + "\n\nforward+backward, ours against the fastest other:\n\n"
          + summary(rows))
    if args.write_table:
        write_table(args, rows, device)
    return 0


def write_table(args, rows: list[Row], device: torch.device) -> None:
    from kernels import auto_table
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, device_cls = props.name, auto_table.device_class(props.name, (props.major, props.minor))
        timing = "ms of one forward+backward, CUDA-graph replay (launched where capture failed), median of triton.testing.do_bench"
    else:
        name, device_cls = "CPU under TRITON_INTERPRET=1 (--smoke: NOT a measurement)", "cpu-smoke"
        timing = "wall clock of one call after one warm-up (--smoke)"
    entry = table_entry(rows, name, args.command, timing)
    path = args.table or auto_table.TABLE_PATH
    table = auto_table.write_entry(path, device_cls, entry)
    limits = auto_table.triton_limits(table["device_classes"][device_cls]["measurements"])
    print(f"\nwrote {len(entry['measurements'])} measurements for device class {device_cls} to {path}; "
          f"model.kernels auto runs Triton for: {limits or 'nothing (PyTorch everywhere)'}")


if __name__ == "__main__":
    sys.exit(main())
