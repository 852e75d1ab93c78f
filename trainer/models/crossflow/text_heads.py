"""The other side of z0's alignment term for the paper's ablations of the contrastive loss
(``objective.contrastive``; Table 3, 70M model, FID-10K: image_text 33.41, text_text 34.67,
reconstruction 40.78). Only the head of the variant in use is built; image_text's is the
``ImageEncoder``.

Both read the language model's features themselves (the Text VE's input, before any
``model.text_proj``), pooled over the real tokens: ``pooled_text_features``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def pooled_text_features(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """emb (B, n, d), mask (B, n) True = real token -> the mean over real tokens (B, d); a caption
    with no real token pools to 0."""
    weights = mask.to(emb.dtype)[..., None]  # (B, n, 1)
    return (emb * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)  # (B, d)


class TextFeatureEmbedder(nn.Module):
    """text_text contrastive: a learned linear projection of the pooled language-model features to
    the flattened z0's size, with its own CLIP-style learnable temperature. InfoNCE between z0 and
    this keeps the text's semantics in z0 without z0 ever seeing the image (paper: FID-10K 34.67,
    against 33.41 for image-text)."""

    def __init__(self, text_dim: int, latent_shape: tuple[int, int, int], init_temperature: float = 0.07):
        super().__init__()
        # log(1 / T), shape (1,) as the image encoder's (DeepSpeed broadcasts no 0-d tensors).
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.proj = nn.Linear(text_dim, math.prod(latent_shape))

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B, n, d), mask (B, n) -> (embedding (B, C*H*W) unnormalized, logit scale (1,))."""
        return self.proj(pooled_text_features(emb, mask)), self.logit_scale  # (B, CHW)


class TextFeatureDecoder(nn.Module):
    """reconstruction: a small MLP from the flattened z0 back to the pooled language-model features
    (Linear -> GELU -> Linear, hidden width = the feature width), trained by MSE: an autoencoding
    term in place of a contrastive one (paper: FID-10K 40.78, the worst of the three)."""

    def __init__(self, latent_shape: tuple[int, int, int], text_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(math.prod(latent_shape), text_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(text_dim, text_dim))

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        """z0 (B, C, H, W) -> reconstructed pooled features (B, d)."""
        return self.mlp(z0.flatten(1))  # (B, d)
