"""Building blocks shared by the Text VE and the flow networks.

Modules that run a fusable op hold ``self.ops``: a namespace with ``attention``, ``modulate``,
``gated_residual`` (see ``kernels.reference``). The model is built with the PyTorch references;
``set_ops`` (``SwappableOps``) swaps in the Triton ops from outside, so model code never picks kernels.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from kernels import get_ops

TORCH_OPS = get_ops("torch")  # the default; set_ops swaps in others


class SwappableOps:
    """Mixin for a model: ``set_ops`` swaps the fusable ops of every submodule that holds ``ops``."""

    def set_ops(self, ops) -> None:
        for m in self.modules():
            if hasattr(m, "ops"):
                m.ops = ops


class Attention(nn.Module):
    """Multi-head self-attention, non-causal, with an optional key-padding mask (True = real token)."""

    def __init__(self, dim: int, head_dim: int, qkv_bias: bool = True):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not a multiple of head_dim {head_dim}")
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, hd)
        out = self.ops.attention(qkv[0], qkv[1], qkv[2], key_padding_mask)  # (B, H, N, hd)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TimestepEmbedder(nn.Module):
    """Scalar t in [0, 1] -> (B, D): sinusoidal features of 1000 t, then a 2-layer MLP (as in DiT)."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10_000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))  # (B, D)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding (grid*grid, dim), as in MAE/DiT."""
    if dim % 4:
        raise ValueError(f"sincos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1)[:, None] * omega[None]  # (T, dim/4)
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (T, dim/2)

    return torch.cat([embed(yy), embed(xx)], dim=1).float()  # (T, dim)


def register_pos_embed(module: nn.Module, kind: str, dim: int, grid: int) -> None:
    """``module.pos_embed`` (1, grid*grid, dim): a fixed sin-cos buffer, or a parameter that starts there."""
    if kind == "sincos":
        module.register_buffer("pos_embed", sincos_2d(dim, grid)[None], persistent=False)
    elif kind == "learned":
        module.pos_embed = nn.Parameter(sincos_2d(dim, grid)[None].clone())
    else:
        raise ValueError(f"pos_embed must be sincos or learned, got {kind!r}")
