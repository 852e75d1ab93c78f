"""The flow network: a vanilla DiT over latent patches, no cross-attention.

The only inputs are x_t, t and a binary CFG indicator; the indicator is a learned token
prepended to the patch sequence (index 1 = conditional, 0 = unconditional), so the
sequence is 1 + (H/p)(W/p) tokens. Time conditions every block through adaLN-Zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.crossflow.layers import (TORCH_OPS, Attention, Mlp, TimestepEmbedder, init_dit_weights,
                                             register_pos_embed)

CONDITIONAL, UNCONDITIONAL = 1, 0


class DiTBlock(nn.Module):
    """Pre-norm self-attention + MLP, each modulated by (shift, scale) and gated, from c."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, head_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.ops = self.attn.ops

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        x = self.ops.gated_residual(x, gate_a, self.attn(self.ops.modulate(x, shift_a, scale_a)))  # (B, T, D)
        return self.ops.gated_residual(x, gate_m, self.mlp(self.ops.modulate(x, shift_m, scale_m)))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, channels: int):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * channels)
        self.ops = TORCH_OPS

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (B, D) each
        return self.linear(self.ops.modulate(x, shift, scale))  # (B, T, p*p*C)


class FlowTransformer(nn.Module):
    def __init__(self, latent_shape: tuple[int, int, int], hidden_size: int, depth: int, head_dim: int,
                 patch_size: int, mlp_ratio: float = 4.0, pos_embed: str = "sincos"):
        super().__init__()
        C, H, W = latent_shape
        if H != W or H % patch_size:
            raise ValueError(f"latent {latent_shape} must be square with a side divisible by patch {patch_size}")
        self.latent_shape, self.patch_size, self.hidden_size = tuple(latent_shape), patch_size, hidden_size
        self.grid = H // patch_size
        self.patch_embed = nn.Conv2d(C, hidden_size, kernel_size=patch_size, stride=patch_size)
        register_pos_embed(self, pos_embed, hidden_size, self.grid)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.indicator = nn.Parameter(torch.zeros(2, hidden_size))  # [unconditional, conditional]
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, head_dim, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, C)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_dit_weights(self)
        nn.init.normal_(self.indicator, std=0.02)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        B, p, g, C = x.shape[0], self.patch_size, self.grid, self.latent_shape[0]
        x = x.view(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,) in [0, 1], indicator (B,) 1 = conditional -> velocity (B, C, H, W)."""
        x = self.patch_embed(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        ind = self.indicator[indicator.long()][:, None, :].to(x.dtype)  # (B, 1, D)
        x = torch.cat([ind, x], dim=1)  # (B, 1 + T, D)
        c = self.t_embedder(t)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x[:, 1:], c)  # (B, T, p*p*C): the indicator token is dropped
        return self.unpatchify(x)
