"""CrossFlow = Text VE + flow transformer (+ the contrastive image encoder used in training).

The flow network is the shared DiT trunk (``trunk.py``) with an indicator token. Two separate
methods, no mode flags:
    encode_text(emb, mask)        -> z0, mu, logvar      (the source of the flow, t = 0)
    velocity(x_t, t, indicator)   -> v                   (carries z0 to the image latent, t = 1)
``text_condition`` returns None: all CrossFlow knows of the text is in z0. (The cross-attention
baseline, same interface, returns the tokens there and reads them in ``velocity``.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL, FlowTransformer
from trainer.models.crossflow.image_encoder import ImageEncoder
from trainer.models.crossflow.layers import SwappableOps
from trainer.models.crossflow.text_ve import TextProjection, TextVE
from trainer.models.crossflow.trunk import TrunkArgs

__all__ = ["CrossFlow", "CrossFlowArgs", "resolve_args", "CONDITIONAL", "UNCONDITIONAL"]


@dataclass(frozen=True, kw_only=True)
class CrossFlowArgs(TrunkArgs):
    """Everything needed to rebuild the model (stored in checkpoints and exports): the trunk's
    size fields plus the Text VE's and the image encoder's."""
    text_ve_width: int
    text_ve_depth: int
    text_ve_reduced_width: int
    text_ve_dropout: float
    image_encoder_width: int
    init_temperature: float = 0.07
    family: str = "crossflow"  # model.family; checkpoints without it are CrossFlow


resolve_args = CrossFlowArgs.from_config  # (model_cfg, latent_shape, text_dim, max_tokens, init_temperature)


class CrossFlow(SwappableOps, nn.Module):
    source_from_text = True  # z0 comes from the text: contrastive loss, z0 interpolation and arithmetic apply

    def __init__(self, args: CrossFlowArgs):
        super().__init__()
        if args.family != "crossflow":
            raise ValueError(f"CrossFlow needs family 'crossflow', got {args.family!r}")
        self.args = args
        self.text_proj = TextProjection(args.text_dim, args.text_proj_dim) if args.text_proj_dim else None
        self.text_ve = TextVE(args.text_proj_dim or args.text_dim, args.max_tokens, args.latent_shape, args.text_ve_width,
                              args.text_ve_depth, args.text_ve_reduced_width, dropout=args.text_ve_dropout)
        self.flow = FlowTransformer(args)
        self.image_encoder = ImageEncoder(args.latent_shape, args.image_encoder_width, args.init_temperature)

    def encode_text(self, emb: torch.Tensor, mask: torch.Tensor, *, use_mean: bool = False,
                    generator: torch.Generator | None = None,
                    eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """emb (B, n, d), mask (B, n) -> z0 = mu + exp(logvar / 2) * eps, mu, logvar; each (B, C, H, W).
        eps is drawn from ``generator`` unless given."""
        if self.text_proj is not None:
            emb = self.text_proj(emb)  # (B, n, text_proj_dim)
        mu, logvar = self.text_ve(emb, mask)
        if use_mean:
            return mu, mu, logvar
        if eps is None:
            eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype), mu, logvar

    def text_condition(self, emb: torch.Tensor, mask: torch.Tensor) -> None:
        """No condition input besides z0 and the indicator (no cross-attention)."""
        return None

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor, cond: None = None) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,), indicator (B,) 1 = conditional -> v (B, C, H, W)."""
        if cond is not None:
            raise ValueError("CrossFlow takes no text condition in velocity: the text is in z0")
        return self.flow(x_t, t, indicator)

    def embed_image(self, z1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Target latent (B, C, H, W) -> (contrastive embedding (B, C*H*W), learned logit scale (1,))."""
        return self.image_encoder(z1)

    def flow_params(self) -> int:
        """Parameters of the flow transformer alone (how the paper counts model size)."""
        return sum(p.numel() for p in self.flow.parameters())

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample of the flow transformer (3 x forward, 2 FLOPs per multiply-add):
        token matmuls on every token, the time-conditioned modulation once per sample, plus
        attention; the Text VE and image encoder excluded (small next to it at scale). Counted
        like ``CrossAttentionFM.flops_per_sample`` so the two share a compute axis."""
        a = self.args
        tokens = 1 + (a.latent_shape[1] // a.patch_size) ** 2
        per_sample = self.flow.per_sample_params()
        dense = 6 * ((self.flow_params() - per_sample) * tokens + per_sample)
        attention = 6 * 2 * a.depth * tokens * tokens * a.hidden_size  # QK^T and AV, fwd + bwd
        return float(dense + attention)
