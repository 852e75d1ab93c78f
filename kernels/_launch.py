"""Helpers shared by the Triton launchers: device checks and output allocation.

Nothing here imports triton. ``TRITON_INTERPRET`` is read by ``triton.jit`` when a kernel
is *decorated*, i.e. when an op module (``kernels.attention``, ...) is first imported, so
it must be set before that import, not merely before a launch.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_POISON = False


def interpret_enabled() -> bool:
    """True when TRITON_INTERPRET asks for the CPU interpreter (same parsing as triton)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def check_launchable(op: str, interpreted: bool, *tensors: torch.Tensor) -> None:
    """Raise a clear error when the op's Triton kernels cannot run on these tensors.

    ``interpreted``: whether the op module was imported with TRITON_INTERPRET=1, which is
    what decided if its kernels are compiled or interpreted.
    """
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"kernels.{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if interpreted:
            return
        raise RuntimeError(
            f"kernels.{op}: the Triton kernels got CPU tensors but were not built for the "
            "interpreter. Set TRITON_INTERPRET=1 in the environment before the first "
            "`import kernels.<op module>` (or use the torch backend: kernels.get_ops('torch', ...)).")
    raise RuntimeError(f"kernels.{op}: Triton kernels need a CUDA device (or CPU under "
                       f"TRITON_INTERPRET=1), got {device}")


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or a tensor full of NaN inside ``poison_outputs()`` (tests: unwritten
    elements then show up instead of reading back whatever the allocator left there)."""
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Test hook: every buffer a launcher allocates starts as NaN while this is active."""
    global _POISON
    previous, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = previous


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
