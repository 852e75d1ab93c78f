"""Resampling of image batches in [-1, 1]: the super-resolution task's low-resolution input and its
bicubic baseline both come from here, so the model and the baseline see the same pixels."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_batch(x: torch.Tensor, side: int, what: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{what} takes a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if side < 1:
        raise ValueError(f"{what}: the output side must be a positive number of pixels, got {side}")


def area_downsample(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side): each output pixel the mean of the input pixels it covers
    (box filter, no aliasing when ``side`` divides the input side)."""
    _check_batch(x, side, "area_downsample")
    return F.interpolate(x, size=(side, side), mode="area")  # (B, C, side, side)


def bicubic_upsample(x: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, h, w) in [-1, 1] -> (B, C, side, side) in [-1, 1]: bicubic interpolation (half-pixel
    centers, as PIL and torchvision resize), clamped since the cubic kernel overshoots at edges."""
    _check_batch(x, side, "bicubic_upsample")
    up = F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)  # (B, C, side, side)
    return up.clamp(-1.0, 1.0)
