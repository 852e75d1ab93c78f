"""Compile every Triton kernel variant the launchers can pick, for real GPU targets, on a machine
without a GPU: the compile gate behind tests/kernels/test_compile_gate.py.

    python tests/kernels/compile_variants.py [--targets 90 80] [--jobs 2] [--json out.json]

The interpreter (TRITON_INTERPRET=1) accepts programs the real compiler refuses, so this runs with
it off (the script refuses to start otherwise) and takes each kernel through triton's own pipeline
down to a cubin with the ptxas shipped in the triton wheel; no driver is needed.

Where the variants come from: the launchers themselves. Each op's real launch code
(``kernels.attention.attention_forward``/``attention_backward``, the autograd Functions of
``kernels.flow_loss`` and ``kernels.modulation``) runs on fake CUDA tensors (torch's
FakeTensorMode: shapes, strides and dtypes, no memory) while ``KernelInterface.__getitem__``
records each ``kernel[grid](*args, **kwargs)`` instead of launching it. A recorded launch of an
autotuned kernel becomes one variant per config its autotuner would try (after its own
``early_config_prune``). The branches come from the launchers' tables: every dtype of
``attention.SUPPORTED_DTYPES`` and every head dim of the shipped configs (configs/paper/*,
configs/demo.yaml) that ``attention.SUPPORTED_HEAD_DIMS`` allows, with and without the padding
mask; the memory-bound ops in fp32, bf16 and fp16 with every combination of inputs that need a
gradient (the NEED_* branches of their backward kernels); modulate and gated_residual at each
shipped width. A new autotune config, dtype or kernel launch is therefore compiled without
editing this file. The signature, constexprs and specialization attributes (16-byte alignment,
ints equal to 1) are computed by triton's own binder from the recorded arguments, as
``JITFunction.run`` does at a launch.

Failures: a compile error (Triton front end, LLVM or ptxas), or static shared memory above the
target's per-block limit. Reported: registers per thread and spill bytes (parsed from
``ptxas -v``, which triton runs and whose log it prints with ``knobs.nvidia.dump_ptxas_log``;
triton's own ``n_regs``/``n_spills`` come from the driver when a cubin is loaded).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
import multiprocessing

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Largest shared memory one block may use, in bytes, by compute capability: the CUDA C++
# Programming Guide, "Technical Specifications per Compute Capability" ("Maximum amount of shared
# memory per thread block": 163 KB on 8.0, 227 KB on 9.0), which is what the driver reports as
# cudaDevAttrMaxSharedMemoryPerBlockOptin (166912 on an A100, 232448 on an H100) and what triton
# compares a kernel's metadata.shared against before loading it (CompiledKernel._init_handles).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
TOKENS = 257  # a representative length (256 patches + the indicator): it enters a kernel only as
#               an int argument (not 16-aligned, not 1), so every length > 1 gives the same binary
SHIPPED_CONFIGS = (sorted((REPO / "configs" / "paper").glob("*.yaml"))
                   + [REPO / "configs" / "demo.yaml", REPO / "configs" / "shapes_tiny.yaml"])
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Variant:
    """One kernel binary a launcher can ask for: a kernel and the arguments it is launched with."""

    name: str
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict = field(default_factory=dict)


class DevicePointer:
    """A recorded tensor argument: its dtype and where it starts (relative to a 256-aligned
    allocation, as CUDA's caching allocator gives), which is all triton's binder reads."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self._offset = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._offset


class GradContext:
    """What an autograd Function's forward/backward use of ``ctx`` (FakeTensorMode has no CUDA
    autograd engine here, so the gate calls the Functions' static methods itself)."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = tuple(needs_input_grad)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


@contextlib.contextmanager
def recorded_launches(into: list, case: str):
    """``kernel[grid](*args, **kwargs)`` appends (case, kernel, args, kwargs) to ``into``, launches nothing."""
    import torch
    from triton.runtime.jit import KernelInterface

    def record(kernel, grid):
        def launch(*args, **kwargs):
            args = tuple(DevicePointer(a) if isinstance(a, torch.Tensor) else a for a in args)
            into.append((case, kernel, args, kwargs))
        return launch

    previous = KernelInterface.__getitem__
    KernelInterface.__getitem__ = record
    try:
        yield
    finally:
        KernelInterface.__getitem__ = previous


def shipped_model_shapes() -> tuple[set[int], set[int]]:
    """(widths, head dims) of the flow transformers the shipped configs build."""
    from trainer.config import load_config
    from trainer.models.crossflow.presets import PRESETS
    widths, head_dims = set(), set()
    for path in SHIPPED_CONFIGS:
        model = load_config(path).model
        preset = PRESETS[model.preset]
        widths.add(model.hidden_size or preset.hidden_size)
        head_dims.add(model.head_dim or preset.head_dim)
    return widths, head_dims


def grad_flags(n: int):
    """Every way n inputs can need a gradient, at least one of them."""
    return [flags for flags in itertools.product((True, False), repeat=n) if any(flags)]


def attention_launches(head_dims, record) -> None:
    import torch
    from kernels import attention
    unsupported = set(head_dims) - set(attention.SUPPORTED_HEAD_DIMS)
    if unsupported:
        raise SystemExit(f"shipped configs use head dims {sorted(unsupported)} that kernels.attention "
                         f"does not support ({attention.SUPPORTED_HEAD_DIMS})")
    for dtype, D, has_mask in itertools.product(attention.SUPPORTED_DTYPES, sorted(head_dims), (False, True)):
        B, H, N = 2, 4, TOKENS
        # the model's layout: q, k, v are strided views of one (B, N, 3, H, D) projection
        qkv = torch.empty(B, N, 3, H, D, device="cuda", dtype=dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
        q, k, v = qkv[0], qkv[1], qkv[2]
        mask = torch.ones(B, N, dtype=torch.bool, device="cuda") if has_mask else None
        keep = attention._keep_mask(mask, q)
        name = f"attention {str(dtype)[6:]} D{D} {'mask' if has_mask else 'nomask'}"
        with record(name + " fwd"):
            o, lse = attention.attention_forward(q, k, v, keep, has_mask)
        with record(name + " bwd"):
            attention.attention_backward(torch.empty_like(o), q, k, v, o, lse, keep, has_mask)


def flow_loss_launches(record) -> None:
    import torch
    from kernels import flow_loss
    for dtype in FLOAT_DTYPES:
        latents = [torch.empty(2, 4, 32, 32, device="cuda", dtype=getattr(torch, dtype)) for _ in range(3)]
        t = torch.empty(2, device="cuda", dtype=torch.float32)
        for needs in grad_flags(3):
            tag = "".join(n for n, need in zip(("v", "z0", "z1"), needs) if need)
            ctx = GradContext(needs + (False,))
            with record(f"flow_matching_loss {dtype} grad[{tag}]"):
                loss = flow_loss.FlowMatchingLossFunction.forward(ctx, *latents, 1e-5)
                flow_loss.FlowMatchingLossFunction.backward(ctx, torch.empty_like(loss))
            tag = "".join(n for n, need in zip(("z0", "z1", "t"), needs) if need)
            ctx = GradContext(needs + (False,))
            with record(f"interpolate {dtype} grad[{tag}]"):
                x = flow_loss.InterpolateFunction.forward(ctx, latents[0], latents[1], t, 1e-5)
                flow_loss.InterpolateFunction.backward(ctx, torch.empty_like(x))


def modulation_launches(widths, record) -> None:
    import torch
    from kernels import modulation
    for dtype, D in itertools.product(FLOAT_DTYPES, sorted(widths)):
        x, y = (torch.empty(2, TOKENS, D, device="cuda", dtype=getattr(torch, dtype)) for _ in range(2))
        shift, scale = (torch.empty(2, D, device="cuda", dtype=getattr(torch, dtype)) for _ in range(2))
        ctx = GradContext((True, True, True))
        with record(f"modulate {dtype} D{D}"):
            out = modulation.ModulateFunction.forward(ctx, x, shift, scale)
            modulation.ModulateFunction.backward(ctx, torch.empty_like(out))
        for needs in grad_flags(2):  # (gate, y); dx is the upstream gradient, no kernel
            tag = "".join(n for n, need in zip(("gate", "y"), needs) if need)
            ctx = GradContext((True,) + needs)
            with record(f"gated_residual {dtype} D{D} grad[{tag}]"):
                out = modulation.GatedResidualFunction.forward(ctx, x, shift, y)
                modulation.GatedResidualFunction.backward(ctx, torch.empty_like(out))


def launcher_variants() -> list[Variant]:
    """Every (kernel, arguments) the launchers can launch, autotune configs expanded, duplicates
    (same kernel, same arguments) dropped."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes"):
        raise SystemExit("compile_variants needs the real compiler: unset TRITON_INTERPRET")
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Autotuner

    launches: list = []
    widths, head_dims = shipped_model_shapes()
    with FakeTensorMode(allow_non_fake_inputs=True):
        record = lambda case: recorded_launches(launches, case)  # noqa: E731
        attention_launches(head_dims, record)
        flow_loss_launches(record)
        modulation_launches(widths, record)

    variants, seen = [], set()
    for case, kernel, args, kwargs in launches:
        if isinstance(kernel, Autotuner):
            kernel.nargs = dict(zip(kernel.arg_names, args))  # what Autotuner.run sets before pruning
            configs = kernel.prune_configs(kwargs)
            kernel.nargs = None
            expanded = [(kernel.fn, {**kwargs, **c.all_kwargs()}) for c in configs]
        else:
            expanded = [(kernel, kwargs)]
        for fn, kw in expanded:
            key = (fn.fn.__qualname__, _signature_key(args), tuple(sorted(kw.items(), key=str)))
            if key in seen:
                continue
            seen.add(key)
            meta = " ".join(f"{k}={v}" for k, v in sorted(kw.items()) if k.isupper() and k not in ("DOT_PRECISION",)
                            and not k.startswith(("NEED_", "HAS_", "HEAD_")))
            warps = f"w{kw.get('num_warps', 4)}s{kw.get('num_stages', 3)}"
            variants.append(Variant(f"{case} {fn.fn.__name__.strip('_')} {meta} {warps}".replace("  ", " "),
                                    fn, args, kw))
    return variants


def _signature_key(args) -> tuple:
    return tuple((str(a.dtype), a.data_ptr() % 16) if isinstance(a, DevicePointer) else
                 (type(a).__name__, a == 1, isinstance(a, int) and a % 16 == 0) for a in args)


# ----------------------------------------------------------------------------- compiling
_PTXAS_INFO = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_variant(variant: Variant, arch: int) -> dict:
    """Compile one variant for sm_<arch> down to a cubin. Returns its report row."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = variant.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # As JITFunction.run: launch options, then the binder's specialization, then _pack_args.
    kwargs = dict(variant.kwargs, debug=fn.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*variant.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    row = {"name": variant.name, "arch": arch, "error": None}
    log = io.StringIO()
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as err:  # a compile error is this variant's result, reported with its name
        row["error"] = f"{type(err).__name__}: {err}"[:4000]
        row["seconds"], row["cpu_seconds"] = time.perf_counter() - start, _cpu_seconds() - cpu_start
        return row
    row["seconds"], row["cpu_seconds"] = time.perf_counter() - start, _cpu_seconds() - cpu_start
    meta = compiled.metadata
    row["shared"] = meta.shared
    row["shared_limit"] = SHARED_LIMIT[arch]
    row["num_warps"], row["num_stages"] = meta.num_warps, meta.num_stages
    row["cubin_bytes"] = len(compiled.asm["cubin"])
    text = log.getvalue()
    regs = _PTXAS_INFO.search(text)
    spills = _SPILLS.search(text)
    row["regs"] = int(regs.group(1)) if regs else None
    row["spill_bytes"] = (int(spills.group(1)) + int(spills.group(2))) if spills else None
    if meta.shared > SHARED_LIMIT[arch]:
        row["error"] = f"shared memory {meta.shared} B > sm_{arch} limit {SHARED_LIMIT[arch]} B per block"
    return row


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a figure the machine's load
    does not inflate."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


_VARIANTS: list[Variant] = []  # the pool's workers inherit it (fork): jobs are indices into it


def _compile_job(job: tuple[int, int]) -> dict:
    index, arch = job
    return compile_variant(_VARIANTS[index], arch)


def _expected_cost(variant: Variant) -> int:
    """Rough compile cost rank: fp32 attention (full-precision dots: several seconds each), then
    attention, then the memory-bound kernels (a fraction of a second)."""
    if variant.name.startswith("attention"):
        return 2 if "float32" in variant.name else 1
    return 0


def compile_all(targets: list[int], jobs: int) -> list[dict]:
    """Every variant for every target, slowest first over one pool (so no worker idles at the
    end), rows returned in variant order."""
    global _VARIANTS
    _VARIANTS = launcher_variants()
    work = sorted(((i, arch) for arch in targets for i in range(len(_VARIANTS))),
                  key=lambda job: -_expected_cost(_VARIANTS[job[0]]))
    if jobs <= 1:
        rows = [_compile_job(w) for w in work]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            rows = list(pool.map(_compile_job, work))
    order = {job: n for n, job in enumerate((i, arch) for arch in targets for i in range(len(_VARIANTS)))}
    return [row for _, row in sorted(zip(work, rows), key=lambda pair: order[pair[0]])]


def report(rows: list[dict], seconds: float) -> str:
    lines = [f"{'variant':<92} {'sm':>3} {'shared B':>9} {'regs':>5} {'spill B':>8} {'s':>6}"]
    for r in rows:
        if r["error"] and "shared" not in r:
            lines.append(f"{r['name']:<92} {r['arch']:>3} FAILED: {r['error'].splitlines()[0][:200]}")
            continue
        spill = r["spill_bytes"] if r["spill_bytes"] is not None else "?"
        lines.append(f"{r['name']:<92} {r['arch']:>3} {r['shared']:>9} {r['regs'] or '?':>5} {spill:>8} "
                     f"{r['seconds']:>6.2f}" + (f"  FAILED: {r['error']}" if r["error"] else ""))
    lines.append(summary(rows, seconds))
    return "\n".join(lines)


def summary(rows: list[dict], seconds: float) -> str:
    parts = []
    for arch in sorted({r["arch"] for r in rows}, reverse=True):
        mine = [r for r in rows if r["arch"] == arch]
        ok = [r for r in mine if not r["error"]]
        spilling = [r for r in ok if r.get("spill_bytes")]
        max_shared = max((r["shared"] for r in mine if "shared" in r), default=0)
        parts.append(f"{len(ok)} of {len(mine)} variants compiled for sm_{arch} (max shared "
                     f"{max_shared / 1024:.1f} KiB of {SHARED_LIMIT[arch] // 1024}, "
                     f"{len(spilling)} spilling registers)")
    cpu = sum(r.get("cpu_seconds", 0.0) for r in rows)
    return "; ".join(parts) + f"; {seconds:.0f} s wall, {cpu:.0f} s CPU"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT),
                   help="compute capabilities to compile for")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    p.add_argument("--json", default="", help="write every row here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = compile_all(args.targets, args.jobs)
    seconds = time.perf_counter() - start
    print(report(rows, seconds))
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=1))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
