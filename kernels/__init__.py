"""Fused GPU ops for CrossFlow's hot path, with PyTorch references.

Importing this package has no side effects and imports neither torch nor triton
(transformers probes any top-level package named ``kernels``; ours must look like nothing
it knows, so there is deliberately no ``__version__``).

    ops = kernels.get_ops("auto", device)   # what the model uses: backend chosen by config
    ops = kernels.compose_ops({"attention": "cudnn", "modulate": "triton", ...}, device)  # per op
    ops.attention(q, k, v, key_padding_mask)
    ops.flow_matching_loss(v_pred, z0, z1, sigma_min, weight)
    ops.interpolate(z0, z1, t, sigma_min)
    ops.modulate(x, shift, scale)
    ops.gated_residual(x, gate, y)

The Triton ops live one file each, with their launchers and autograd Functions:
``from kernels.attention import attention``, ``from kernels.flow_loss import flow_matching_loss,
interpolate``, ``from kernels.modulation import modulate, gated_residual`` (what
``get_ops("triton")`` returns). ``kernels.reference`` holds the PyTorch references with the same
signatures, and ``kernels.sdpa.attention`` is SDPA with cuDNN as the first backend.
Under the CPU interpreter, TRITON_INTERPRET=1 must be set before a Triton file is first imported.

The package does not re-export the ops: ``kernels.attention`` is the file. A package attribute
named like a submodule is overwritten by the import system when that submodule loads, so neither a
module-level ``__getattr__`` (PEP 562) nor a plain assignment could keep it the function without
replacing the module's class.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

__all__ = ["KernelOps", "get_ops", "compose_ops", "measured_ops", "ops_for_device_class"]

# op name -> submodule holding its Triton implementation
_OP_MODULES = {
    "attention": "attention",
    "flow_matching_loss": "flow_loss",
    "interpolate": "flow_loss",
    "modulate": "modulation",
    "gated_residual": "modulation",
}
BACKENDS = ("auto", "triton", "torch")
# "cudnn" (attention only): kernels.sdpa, SDPA with cuDNN first. "by-length" (attention only):
# Triton up to BY_LENGTH_MAX_TRITON_N tokens, "cudnn" above.
IMPLEMENTATIONS = ("triton", "torch", "cudnn", "by-length")
BY_LENGTH_MAX_TRITON_N = 512


@dataclass(frozen=True)
class KernelOps:
    """The five ops. ``backend``: "triton", "torch", or "auto" (``implementations`` says which
    implementation each op uses)."""

    backend: str
    attention: Callable
    flow_matching_loss: Callable
    interpolate: Callable
    modulate: Callable
    gated_residual: Callable

    @property
    def implementations(self) -> dict[str, str]:
        """op -> "triton", "torch", "cudnn", "by-length" or "measured" (``auto``'s per-call choice
        from kernels/auto_table.json), read off each op's module."""
        where = {"kernels.reference": "torch", "kernels.sdpa": "cudnn", __name__: "by-length",
                 "kernels.auto_table": "measured"}
        return {op: where.get(getattr(self, op).__module__, "triton") for op in _OP_MODULES}


def _triton_op(name: str) -> Callable:
    module = importlib.import_module(f"{__name__}.{_OP_MODULES[name]}")
    return getattr(module, name)


def get_ops(backend: str = "auto", device: "torch.device | str" = "cpu") -> KernelOps:
    """The ops for ``backend`` on ``device``.

    backend: "auto" = on CUDA, Triton where kernels/auto_table.json says it was correct and faster
             than PyTorch on this device's class (per op, dtype, width and length; see
             ``kernels.auto_table``), the PyTorch reference everywhere else (CPU included);
             "triton" = always Triton (on CPU only under TRITON_INTERPRET=1, else an error);
             "torch" = the PyTorch reference (``kernels.reference``).
    """
    import torch

    device = torch.device(device)
    if backend not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return measured_ops(device)
        backend = "torch"
    if backend == "torch":
        from . import reference
        return KernelOps("torch", *(getattr(reference, name) for name in _OP_MODULES))
    if device.type == "cpu":
        from ._launch import interpret_enabled
        if not interpret_enabled():
            raise RuntimeError(
                "kernels backend 'triton' on CPU needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "in the environment before the kernels are first imported (slow; for tests), or use "
                "backend 'auto'/'torch' off CUDA.")
    elif device.type != "cuda":
        raise RuntimeError(f"kernels backend 'triton' needs a CUDA device, got {device}")
    return KernelOps("triton", *(_triton_op(name) for name in _OP_MODULES))


def measured_ops(device: "torch.device | str") -> KernelOps:
    """``auto`` on a CUDA device: the ops the measured table gives this device's class."""
    import torch

    from .auto_table import device_class
    props = torch.cuda.get_device_properties(torch.device(device))
    return ops_for_device_class(device_class(props.name, (props.major, props.minor)), device)


def ops_for_device_class(device_cls: str, device: "torch.device | str" = "cpu", table_path=None) -> KernelOps:
    """Per op, Triton where the table (kernels/auto_table.json unless ``table_path``) measured it
    correct and faster on ``device_cls`` for the call's dtype, width and length; the PyTorch
    reference otherwise, and for every op when the class is not in the table."""
    from . import auto_table
    table = auto_table.load_table(table_path or auto_table.TABLE_PATH)
    entry = table["device_classes"].get(device_cls)
    limits = auto_table.triton_limits(entry["measurements"]) if entry else {}
    torch_ops = get_ops("torch", device)
    triton_ops = get_ops("triton", device) if limits else None

    def pick(op: str) -> Callable:
        if op not in limits:
            return getattr(torch_ops, op)
        return auto_table.measured_op(op, getattr(triton_ops, op), getattr(torch_ops, op), limits[op])
    return KernelOps("auto", *(pick(op) for op in _OP_MODULES))


def compose_ops(choices: dict[str, str], device: "torch.device | str" = "cpu", backend: str = "auto") -> KernelOps:
    """Ops picked one by one: ``choices`` maps an op to "triton", "torch" or (attention only)
    "cudnn" or "by-length"; ops not named use the PyTorch reference."""
    unknown = set(choices) - set(_OP_MODULES)
    if unknown:
        raise ValueError(f"unknown kernel ops {sorted(unknown)}; known: {list(_OP_MODULES)}")
    for op, impl in choices.items():
        if impl not in IMPLEMENTATIONS or (impl in ("cudnn", "by-length") and op != "attention"):
            raise ValueError(f"kernels: {op} can't use {impl!r}; choose from triton, torch"
                             + (", cudnn, by-length" if op == "attention" else ""))
    torch_ops = get_ops("torch", device)
    needs_triton = any(impl in ("triton", "by-length") for impl in choices.values())
    triton_ops = get_ops("triton", device) if needs_triton else None

    def pick(op: str) -> Callable:
        impl = choices.get(op, "torch")
        if impl in ("cudnn", "by-length"):
            from . import sdpa
            if impl == "cudnn":
                return sdpa.attention
            return _attention_by_length(triton_ops.attention, sdpa.attention)
        return getattr(triton_ops if impl == "triton" else torch_ops, op)
    return KernelOps(backend, *(pick(op) for op in _OP_MODULES))


def _attention_by_length(short: Callable, long: Callable) -> Callable:
    def attention(q, k, v, key_padding_mask=None):
        """Triton up to BY_LENGTH_MAX_TRITON_N tokens, SDPA with cuDNN first above."""
        fn = short if q.shape[2] <= BY_LENGTH_MAX_TRITON_N else long
        return fn(q, k, v, key_padding_mask)  # (B, H, N, D)
    return attention
