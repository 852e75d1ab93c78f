"""The baseline CrossFlow is measured against: standard flow matching from Gaussian noise, the
text injected by cross-attention (the paper's 1.04B baseline next to CrossFlow's 0.95B).

The shared DiT trunk (``trunk.py``) over latent patches, its blocks running self-attention,
cross-attention to the text tokens (with their padding mask) and an MLP; time conditions every
block through adaLN-Zero. It keeps
CrossFlow's interface, so the objective, the sampler and the loop run either model unchanged:

    encode_text(emb, mask)             -> z0 ~ N(0, I), mu = 0, logvar = 0   (so KL is exactly 0)
    text_condition(emb, mask)          -> TextCondition, passed explicitly to every velocity call
    velocity(x_t, t, indicator, cond)  -> v

Classifier-free guidance: rows with the UNCONDITIONAL indicator attend to a learned null text
instead of their caption; the objective draws them with ``objective.uncond_prob``, as for
CrossFlow. (The objective also shuffles targets among unconditional rows; here that changes
nothing in distribution, since their source is independent noise and their text is dropped.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels import reference
from trainer.models.crossflow.flow_transformer import UNCONDITIONAL
from trainer.models.crossflow.layers import Attention, Mlp
from trainer.models.crossflow.text_ve import TextProjection
from trainer.models.crossflow.trunk import DiTTrunk, TrunkArgs

__all__ = ["CrossAttentionFM", "CrossAttentionFMArgs", "TextCondition", "resolve_baseline_args"]

FAMILY = "cross_attention_fm"


@dataclass(frozen=True)
class CrossAttentionFMArgs(TrunkArgs):
    """Everything needed to rebuild the baseline (stored in checkpoints and exports): the trunk's
    size fields alone, at the same size preset as CrossFlow (no Text VE or image encoder);
    ``text_proj_dim`` projects the text tokens before cross-attention."""
    family: str = FAMILY


resolve_baseline_args = CrossAttentionFMArgs.from_config  # (model_cfg, latent_shape, text_dim, max_tokens)


@dataclass
class TextCondition:
    """What the baseline's velocity reads besides (x_t, t, indicator): the caption's token
    embeddings (B, n, d) and padding mask (B, n), True = real token."""
    emb: torch.Tensor
    mask: torch.Tensor

    def repeat(self, times: int) -> "TextCondition":
        """The batch stacked ``times`` times along dim 0 (CFG runs both branches in one forward)."""
        return TextCondition(self.emb.repeat(times, 1, 1), self.mask.repeat(times, 1))


class CrossAttention(nn.Module):
    """Queries from the image tokens; keys and values projected from the text tokens at the text
    encoder's width (as in LDM / Stable Diffusion), so no separate text projection is needed.

    Runs the PyTorch reference attention (SDPA, which picks a fused kernel on CUDA) and holds no
    ``ops``: the Triton attention in ``kernels`` assumes as many keys as queries.
    """

    def __init__(self, dim: int, text_dim: int, head_dim: int):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not a multiple of head_dim {head_dim}")
        self.heads, self.head_dim = dim // head_dim, head_dim
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(text_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        n = text.shape[1]
        q = self.q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k, v = self.kv(text).view(B, n, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, n, hd) each
        out = reference.attention(q, k, v, mask)  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # (B, T, D)


class CrossDiTBlock(nn.Module):
    """Self-attention and MLP modulated and gated from c (adaLN-Zero, as in DiT); between them
    a pre-norm cross-attention to the text, ungated (as in PixArt-alpha), its output projection
    zero-initialized so the block starts as the identity."""

    def __init__(self, dim: int, text_dim: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, head_dim)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, text_dim, head_dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.ops = self.attn.ops

    def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)  # (B, D) each
        x = self.ops.gated_residual(x, gate_a, self.attn(self.ops.modulate(x, shift_a, scale_a)))  # (B, T, D)
        x = x + self.cross_attn(self.cross_norm(x), text, mask)  # (B, T, D)
        return self.ops.gated_residual(x, gate_m, self.mlp(self.ops.modulate(x, shift_m, scale_m)))


class CrossAttentionFM(DiTTrunk):
    """Flow matching from N(0, I) to the image latent, conditioned on text by cross-attention:
    the DiT trunk with cross-attention blocks, a text path and a learned null text."""

    source_from_text = False  # z0 is noise: no contrastive loss, no z0 interpolation or arithmetic
    source_is_learned = False  # no posterior: KL exactly 0, no contrastive term

    def __init__(self, args: CrossAttentionFMArgs):
        if args.family != FAMILY:
            raise ValueError(f"CrossAttentionFM needs family {FAMILY!r}, got {args.family!r}")
        super().__init__(args)

    def add_condition_inputs(self, args: CrossAttentionFMArgs) -> None:
        self.text_width = args.text_proj_dim or args.text_dim
        self.text_proj = TextProjection(args.text_dim, args.text_proj_dim) if args.text_proj_dim else None
        self.text_norm = nn.LayerNorm(self.text_width, eps=1e-6)
        # What unconditional rows attend to; 1-D, so the engine does not weight-decay it.
        self.null_text = nn.Parameter(torch.zeros(self.text_width))

    def make_block(self, args: CrossAttentionFMArgs) -> nn.Module:
        return CrossDiTBlock(args.hidden_size, self.text_width, args.head_dim, args.mlp_ratio)

    def initialize_condition(self) -> None:
        nn.init.normal_(self.null_text, std=0.02)
        for block in self.blocks:  # and a zero cross-attention output: each block starts as the identity
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    # ------------------------------------------------------------------ the shared interface
    def encode_text(self, emb: torch.Tensor, mask: torch.Tensor, *, use_mean: bool = False,
                    generator: torch.Generator | None = None,
                    eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The source of the flow is noise, whatever the text: z0 = eps ~ N(0, I), drawn from
        ``generator`` unless given (the prior's mean 0 when ``use_mean``), with mu = logvar = 0 so
        the KL term is exactly 0. Each (B, C, H, W)."""
        shape = (emb.shape[0], *self.args.latent_shape)
        mu = torch.zeros(shape, device=emb.device, dtype=emb.dtype)
        if use_mean:
            return mu, mu, mu
        if eps is None:
            eps = torch.randn(shape, generator=generator, device=emb.device, dtype=emb.dtype)
        return eps.to(mu.dtype), mu, mu

    def encode_source(self, source: dict, *, use_mean: bool = False, generator: torch.Generator | None = None,
                      eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CrossFlow's task interface for the one pair this family takes (text_ve -> image):
        ``encode_text`` of ``source["text_emb"]``, ``source["text_mask"]``."""
        return self.encode_text(source["text_emb"], source["text_mask"], use_mean=use_mean, generator=generator,
                                eps=eps)

    def text_condition(self, emb: torch.Tensor, mask: torch.Tensor) -> TextCondition:
        """emb (B, n, d), mask (B, n) -> the condition every ``velocity`` call of this batch takes."""
        return TextCondition(emb, mask.bool())

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, indicator: torch.Tensor,
                 cond: TextCondition | None = None) -> torch.Tensor:
        """x_t (B, C, H, W), t (B,), indicator (B,) 1 = conditional, cond from ``text_condition``
        -> v (B, C, H, W). Unconditional rows (and captions with no real token) see the null text."""
        if cond is None:
            raise ValueError("the cross-attention baseline needs the text: pass cond=model.text_condition(emb, mask)")
        x = self.embed_patches(x_t)  # (B, T, D)
        text = cond.emb.to(x.dtype)  # (B, n, d)
        if self.text_proj is not None:
            text = self.text_proj(text)  # (B, n, text_proj_dim)
        text = self.text_norm(text)  # (B, n, d')
        drop = (indicator == UNCONDITIONAL) | ~cond.mask.any(dim=1)  # (B,)
        text = torch.where(drop[:, None, None], self.null_text.to(text.dtype).expand_as(text), text)
        mask = cond.mask | drop[:, None]  # (B, n): the null text is n real tokens
        c = self.t_embedder(t)  # (B, D)
        for block in self.blocks:
            x = block(x, c, text, mask)
        return self.as_velocity(self.unpatchify(self.final_layer(x, c)), x_t, t)  # (B, C, H, W)

    # ------------------------------------------------------------------ size and cost
    def flow_params(self) -> int:
        """Every parameter: the whole model is the flow network (there is no Text VE)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (3 x forward, 2 FLOPs per multiply-add): image-token matmuls
        on T tokens, the cross-attention k/v projections on the n text tokens, the time-conditioned
        modulation once per sample, plus the attention products (self T x T, cross T x n)."""
        a = self.args
        T, n, D = self.grid ** 2, a.max_tokens, a.hidden_size
        per_sample = self.per_sample_params()
        text_side = sum(p.numel() for name, p in self.named_parameters()  # run on the n text tokens
                        if ".cross_attn.kv." in name or name.startswith("text_proj."))
        per_token = self.flow_params() - per_sample - text_side
        dense = 6 * (per_token * T + text_side * n + per_sample)
        attention = 6 * 2 * a.depth * (T * T + T * n) * D  # QK^T and AV, self and cross
        return float(dense + attention)
