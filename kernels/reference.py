"""PyTorch references for every fused op in ``kernels``.

The model uses these when ``model.kernels: torch`` (or ``auto`` off CUDA); tests and
benchmarks compare the Triton ops against them. Same signatures as the fused ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LAYERNORM_EPS = 1e-6


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal softmax attention. q, k, v: (B, H, N, D); mask (B, N), True = real token."""
    attn_mask = None
    if key_padding_mask is not None:
        attn_mask = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def flow_matching_loss(v_pred: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor,
                       sigma_min: float = 1e-5, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE between v_pred and the target z1 - (1 - sigma_min) z0. Returns (B,)."""
    target = z1 - (1.0 - sigma_min) * z0
    per_sample = (v_pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor,
                sigma_min: float = 1e-5) -> torch.Tensor:
    """x_t = (1 - (1 - sigma_min) t) z0 + t z1, with t of shape (B,)."""
    t = t.view(-1, *([1] * (z0.dim() - 1))).to(z0.dtype)
    return (1.0 - (1.0 - sigma_min) * t) * z0 + t * z1


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift. x: (B, N, D); shift, scale: (B, D). No affine LN."""
    h = F.layer_norm(x, (x.shape[-1],), eps=LAYERNORM_EPS)
    return h * (1 + scale[:, None, :]) + shift[:, None, :]


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y. x, y: (B, N, D); gate: (B, D)."""
    return x + gate[:, None, :] * y
