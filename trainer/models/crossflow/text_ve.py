"""Text Variational Encoder: language-model token embeddings -> a Gaussian over the image latent.

(B, n, d) tokens -> input projection to the VE width -> pre-norm transformer layers with a
key-padding mask -> halving reduction layers per token (width -> width/2 -> ... -> reduced)
-> flatten (n * reduced) -> linear head to 2 * C*H*W: mu and logvar, each (B, C, H, W).
The deterministic variant (``model.text_ve: deterministic``, the paper's "plain encoder" ablation)
is the same trunk with a head to C*H*W only: its output is z0, there is no logvar.
No positional embedding (as in the reimplementation): the language model's token
embeddings already carry position, and the flatten makes the head position-aware.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trainer.models.crossflow.layers import Attention, Mlp


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), mask))  # (B, n, W)
        return x + self.mlp(self.norm2(x))


class TextProjection(nn.Module):
    """The reimplementation's learned down-projection of wide language-model features (T5-XXL's
    4096) before the Text VE: Linear -> GELU -> Linear, per token."""

    def __init__(self, text_dim: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim, out_dim), nn.GELU(approximate="tanh"), nn.Linear(out_dim, out_dim))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.mlp(emb)  # (B, n, d) -> (B, n, out_dim)


class TextVE(nn.Module):
    def __init__(self, text_dim: int, max_tokens: int, latent_shape: tuple[int, int, int],
                 width: int, depth: int, reduced_width: int, head_dim: int = 64, dropout: float = 0.0,
                 variational: bool = True):
        super().__init__()
        if reduced_width > width:
            raise ValueError(f"text VE reduced width {reduced_width} exceeds its width {width}")
        self.latent_shape, self.max_tokens = tuple(latent_shape), max_tokens
        self.in_proj = nn.Linear(text_dim, width)
        self.blocks = nn.ModuleList(EncoderBlock(width, min(head_dim, width), dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        reductions, w = [], width
        while w // 2 >= reduced_width:  # 1024 -> 512 -> ... -> reduced: halve the width per layer
            reductions += [nn.Linear(w, w // 2), nn.GELU(approximate="tanh")]
            w //= 2
        if w != reduced_width:
            reductions += [nn.Linear(w, reduced_width), nn.GELU(approximate="tanh")]
        self.reduce = nn.Sequential(*reductions)
        self.variational = variational
        outputs = 2 if variational else 1  # (mu, logvar) or z0 alone
        self.head = nn.Linear(max_tokens * reduced_width, outputs * math.prod(latent_shape))

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """emb (B, n, d), mask (B, n) True = real token -> mu, logvar, each (B, C, H, W); for the
        deterministic encoder (z0, None)."""
        B, n, _ = emb.shape
        if n != self.max_tokens:
            raise ValueError(f"text VE expects {self.max_tokens} tokens (data.max_tokens), got {n}")
        mask = mask.bool()
        x = self.in_proj(emb)  # (B, n, W)
        for block in self.blocks:
            x = block(x, mask)
        x = self.reduce(self.norm(x))  # (B, n, r)
        x = x * mask[..., None].to(x.dtype)  # padding contributes nothing to the head
        if not self.variational:
            return self.head(x.flatten(1)).view(B, *self.latent_shape), None  # (B, C, H, W)
        mu, logvar = self.head(x.flatten(1)).chunk(2, dim=1)  # (B, CHW) each
        return mu.view(B, *self.latent_shape), logvar.view(B, *self.latent_shape)
