"""The flow network: a vanilla DiT over latent patches (``DiTTrunk``), no cross-attention.

The only inputs are x_t, t and a binary CFG indicator; the indicator is a learned token
prepended to the patch sequence (index 1 = conditional, 0 = unconditional), so the
sequence is 1 + (H/p)(W/p) tokens. Time conditions every block through adaLN-Zero.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from trainer.models.crossflow.trunk import DiTBlock, DiTTrunk, FinalLayer, TrunkArgs

__all__ = ["CONDITIONAL", "UNCONDITIONAL", "FlowTransformer", "DiTBlock", "FinalLayer"]

CONDITIONAL, UNCONDITIONAL = 1, 0


class FlowTransformer(DiTTrunk):
    """The trunk plus the indicator token; reads the size fields of ``args`` (a ``TrunkArgs``)."""

    def add_condition_inputs(self, args: TrunkArgs) -> None:
        self.indicator = nn.Parameter(torch.zeros(2, args.hidden_size))  # [unconditional, conditional]

    def initialize_condition(self) -> None:
        nn.init.normal_(self.indicator, std=0.02)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,) in [0, 1], indicator (B,) 1 = conditional -> velocity (B, C, H, W)."""
        x = self.embed_patches(x_t)  # (B, T, D)
        ind = self.indicator[indicator.long()][:, None, :].to(x.dtype)  # (B, 1, D)
        x = torch.cat([ind, x], dim=1)  # (B, 1 + T, D)
        c = self.t_embedder(t)  # (B, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x[:, 1:], c)  # (B, T, p*p*C): the indicator token is dropped
        return self.as_velocity(self.unpatchify(x), x_t, t)
