"""CrossFlow = Text VE + flow transformer (+ the contrastive image encoder used in training).

Two separate methods, no mode flags:
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
from trainer.models.crossflow.presets import PRESETS
from trainer.models.crossflow.text_ve import TextProjection, TextVE

__all__ = ["CrossFlow", "CrossFlowArgs", "resolve_args", "CONDITIONAL", "UNCONDITIONAL"]


@dataclass(frozen=True)
class CrossFlowArgs:
    """Everything needed to rebuild the model (stored in checkpoints and exports)."""
    latent_shape: tuple[int, int, int]
    text_dim: int
    max_tokens: int
    hidden_size: int
    depth: int
    head_dim: int
    patch_size: int
    mlp_ratio: float
    pos_embed: str
    text_ve_width: int
    text_ve_depth: int
    text_ve_reduced_width: int
    text_ve_dropout: float
    image_encoder_width: int
    init_temperature: float = 0.07
    text_proj_dim: int = 0  # learned projection of the text features before the Text VE; 0 = none
    family: str = "crossflow"  # model.family; checkpoints without it are CrossFlow


def resolve_args(model_cfg, latent_shape, text_dim: int, max_tokens: int,
                 init_temperature: float = 0.07) -> CrossFlowArgs:
    """Preset values, overridden by every non-None field of ``model_cfg`` (a ModelConfig)."""
    p = PRESETS[model_cfg.preset]

    def pick(name: str):
        v = getattr(model_cfg, name)
        return getattr(p, name) if v is None else v

    return CrossFlowArgs(
        latent_shape=tuple(latent_shape), text_dim=text_dim, max_tokens=max_tokens,
        hidden_size=pick("hidden_size"), depth=pick("depth"), head_dim=pick("head_dim"),
        patch_size=pick("patch_size"), mlp_ratio=model_cfg.mlp_ratio, pos_embed=model_cfg.pos_embed,
        text_ve_width=pick("text_ve_width"), text_ve_depth=pick("text_ve_depth"),
        text_ve_reduced_width=pick("text_ve_reduced_width"), text_ve_dropout=model_cfg.text_ve_dropout,
        image_encoder_width=model_cfg.image_encoder_width, init_temperature=init_temperature,
        text_proj_dim=model_cfg.text_proj_dim)


class CrossFlow(nn.Module):
    source_from_text = True  # z0 comes from the text: contrastive loss, z0 interpolation and arithmetic apply

    def __init__(self, args: CrossFlowArgs):
        super().__init__()
        if args.family != "crossflow":
            raise ValueError(f"CrossFlow needs family 'crossflow', got {args.family!r}")
        self.args = args
        self.text_proj = TextProjection(args.text_dim, args.text_proj_dim) if args.text_proj_dim else None
        self.text_ve = TextVE(args.text_proj_dim or args.text_dim, args.max_tokens, args.latent_shape, args.text_ve_width,
                              args.text_ve_depth, args.text_ve_reduced_width, dropout=args.text_ve_dropout)
        self.flow = FlowTransformer(args.latent_shape, args.hidden_size, args.depth, args.head_dim,
                                    args.patch_size, args.mlp_ratio, args.pos_embed)
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

    def set_ops(self, ops) -> None:
        """Swap the fusable ops (attention, modulate, gated_residual) of every submodule."""
        for m in self.modules():
            if hasattr(m, "ops"):
                m.ops = ops

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
        per_sample = sum(p.numel() for name, p in self.flow.named_parameters()
                         if "adaLN_modulation" in name or name.startswith("t_embedder"))
        dense = 6 * ((self.flow_params() - per_sample) * tokens + per_sample)
        attention = 6 * 2 * a.depth * tokens * tokens * a.hidden_size  # QK^T and AV, fwd + bwd
        return float(dense + attention)
