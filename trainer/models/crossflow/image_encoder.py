"""The small trainable image encoder of the contrastive loss (trained jointly, from scratch).

A strided CNN over the target latent (or pixels): three stages that halve the resolution,
an average pool to 4x4, and an MLP head to the dimension of the flattened z0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class ImageEncoder(nn.Module):
    def __init__(self, latent_shape: tuple[int, int, int], width: int = 64, init_temperature: float = 0.07):
        super().__init__()
        # CLIP-style learnable temperature, stored as log(1 / T); shape (1,): DeepSpeed broadcasts no 0-d tensors.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        C = latent_shape[0]
        self.out_dim = math.prod(latent_shape)

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU())

        self.stem = nn.Sequential(nn.Conv2d(C, width, 3, padding=1), nn.SiLU())
        self.stages = nn.Sequential(stage(width, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(nn.Linear(4 * width * 16, 4 * width), nn.SiLU(), nn.Linear(4 * width, self.out_dim))

    def forward(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z1 (B, C, H, W) -> (embedding (B, C*H*W) unnormalized, logit scale (1,))."""
        x = self.pool(self.stages(self.stem(z1)))  # (B, 4w, 4, 4)
        return self.head(x.flatten(1)), self.logit_scale
