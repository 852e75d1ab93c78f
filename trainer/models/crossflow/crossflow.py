"""CrossFlow = Text VE + flow transformer (+ the head of z0's alignment term, used in training:
the contrastive image encoder by default).

The flow network is the shared DiT trunk (``trunk.py``) with an indicator token. Two separate
methods, no mode flags:
    encode_text(emb, mask)        -> z0, mu, logvar      (the source of the flow, t = 0)
    velocity(x_t, t, indicator)   -> v                   (carries z0 to the image latent, t = 1)
``text_condition`` returns None: all CrossFlow knows of the text is in z0. (The cross-attention
baseline, same interface, returns the tokens there and reads them in ``velocity``.)

The paper's ablations are args, not forks: ``text_ve`` (variational, or a deterministic encoder
whose output is z0) and ``contrastive`` (which head z0 aligns with: ``embed_image`` for image_text,
``embed_text_features`` for text_text, ``reconstruct_text_features`` for reconstruction; only that
head is built).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL, FlowTransformer
from trainer.models.crossflow.image_encoder import ImageEncoder
from trainer.models.crossflow.layers import SwappableOps
from trainer.models.crossflow.text_heads import TextFeatureDecoder, TextFeatureEmbedder
from trainer.models.crossflow.text_ve import TextProjection, TextVE
from trainer.models.crossflow.trunk import TrunkArgs

__all__ = ["CrossFlow", "CrossFlowArgs", "resolve_args", "CONDITIONAL", "UNCONDITIONAL"]


@dataclass(frozen=True, kw_only=True)
class CrossFlowArgs(TrunkArgs):
    """Everything needed to rebuild the model (stored in checkpoints and exports): the trunk's
    size fields plus the Text VE's and the alignment head's (checkpoints without the ablation
    fields are the defaults)."""
    text_ve_width: int
    text_ve_depth: int
    text_ve_reduced_width: int
    text_ve_dropout: float
    image_encoder_width: int
    init_temperature: float = 0.07
    text_ve: str = "variational"  # model.text_ve: variational or deterministic
    contrastive: str = "image_text"  # objective.contrastive: the head built (image_text, text_text, reconstruction)
    family: str = "crossflow"  # model.family; checkpoints without it are CrossFlow


resolve_args = CrossFlowArgs.from_config  # (model_cfg, latent_shape, text_dim, max_tokens, init_temperature, contrastive)
TEXT_VE_KINDS = ("variational", "deterministic")
CONTRASTIVE_KINDS = ("image_text", "text_text", "reconstruction")


class CrossFlow(SwappableOps, nn.Module):
    source_from_text = True  # z0 comes from the text: contrastive loss, z0 interpolation and arithmetic apply

    def __init__(self, args: CrossFlowArgs):
        super().__init__()
        if args.family != "crossflow":
            raise ValueError(f"CrossFlow needs family 'crossflow', got {args.family!r}")
        if args.text_ve not in TEXT_VE_KINDS or args.contrastive not in CONTRASTIVE_KINDS:
            raise ValueError(f"CrossFlow text_ve must be one of {TEXT_VE_KINDS} and contrastive one of "
                             f"{CONTRASTIVE_KINDS}, got {args.text_ve!r} and {args.contrastive!r}")
        self.args = args
        self.text_proj = TextProjection(args.text_dim, args.text_proj_dim) if args.text_proj_dim else None
        self.text_ve = TextVE(args.text_proj_dim or args.text_dim, args.max_tokens, args.latent_shape, args.text_ve_width,
                              args.text_ve_depth, args.text_ve_reduced_width, dropout=args.text_ve_dropout,
                              variational=args.text_ve == "variational")
        self.flow = FlowTransformer(args)
        # Built after the flow (creation order fixes the initial weights); only the variant's head.
        self.image_encoder = ImageEncoder(args.latent_shape, args.image_encoder_width, args.init_temperature) \
            if args.contrastive == "image_text" else None
        self.text_feature_embedder = TextFeatureEmbedder(args.text_dim, args.latent_shape, args.init_temperature) \
            if args.contrastive == "text_text" else None
        self.text_feature_decoder = TextFeatureDecoder(args.latent_shape, args.text_dim) \
            if args.contrastive == "reconstruction" else None

    def encode_text(self, emb: torch.Tensor, mask: torch.Tensor, *, use_mean: bool = False,
                    generator: torch.Generator | None = None,
                    eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """emb (B, n, d), mask (B, n) -> z0 = mu + exp(logvar / 2) * eps, mu, logvar; each (B, C, H, W).
        eps is drawn from ``generator`` unless given. The deterministic encoder returns (z0, z0, None):
        z0 is its output whatever ``use_mean``, ``eps`` and ``generator`` (a documented no-op: it
        has no noise to sample, so every seed of a prompt gives the same z0)."""
        if self.text_proj is not None:
            emb = self.text_proj(emb)  # (B, n, text_proj_dim)
        mu, logvar = self.text_ve(emb, mask)
        if logvar is None:  # deterministic Text VE
            return mu, mu, None
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
        """image_text: target latent (B, C, H, W) -> (contrastive embedding (B, C*H*W), learned logit scale (1,))."""
        return self._head("image_encoder", "image_text")(z1)

    def embed_text_features(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """text_text: the language model's features emb (B, n, d), mask (B, n) -> (contrastive
        embedding (B, C*H*W), learned logit scale (1,))."""
        return self._head("text_feature_embedder", "text_text")(emb, mask)

    def reconstruct_text_features(self, z0: torch.Tensor) -> torch.Tensor:
        """reconstruction: z0 (B, C, H, W) -> the pooled language-model features it decodes to (B, d)."""
        return self._head("text_feature_decoder", "reconstruction")(z0)

    def _head(self, name: str, variant: str) -> nn.Module:
        head = getattr(self, name)
        if head is None:
            raise ValueError(f"this CrossFlow was built for objective.contrastive={self.args.contrastive!r}; "
                             f"it has no {name} (objective.contrastive={variant!r})")
        return head

    def flow_params(self) -> int:
        """Parameters of the flow transformer alone (how the paper counts model size)."""
        return sum(p.numel() for p in self.flow.parameters())

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample of the flow transformer (3 x forward, 2 FLOPs per multiply-add):
        token matmuls on every token, the time-conditioned modulation once per sample, plus
        attention; the Text VE and the alignment head excluded (small next to it at scale). Counted
        like ``CrossAttentionFM.flops_per_sample`` so the two share a compute axis."""
        a = self.args
        tokens = 1 + (a.latent_shape[1] // a.patch_size) ** 2
        per_sample = self.flow.per_sample_params()
        dense = 6 * ((self.flow_params() - per_sample) * tokens + per_sample)
        attention = 6 * 2 * a.depth * tokens * tokens * a.hidden_size  # QK^T and AV, fwd + bwd
        return float(dense + attention)
