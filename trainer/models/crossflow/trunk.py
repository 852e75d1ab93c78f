"""The DiT trunk both flow networks share: CrossFlow's flow transformer and the cross-attention baseline.

One set of size fields (``TrunkArgs``), resolved from the size preset in one place
(``TrunkArgs.from_config``), and one trunk (``DiTTrunk``): patchify with a position embedding,
a time embedder, a stack of adaLN-Zero blocks, the final layer, unpatchify, DiT's explicit
initialization and the op swap. A family subclasses the trunk and says only what differs:

    add_condition_inputs(args)  its conditioning parameters (the indicator; the baseline's text path)
    make_block(args)            one block of the stack
    initialize_condition()      the init of those parameters, after DiT's

Creation order is DiT's, with the family's parameters between the time embedder and the blocks:
layers draw from the global RNG as they are built and again in ``initialize_weights``, so this
order fixes the initial weights (and, with them, every loss of a seeded run).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from trainer.models.crossflow.layers import (TORCH_OPS, Attention, Mlp, SwappableOps, TimestepEmbedder,
                                             register_pos_embed, sincos_2d)
from trainer.models.crossflow.presets import PRESETS

# x1-prediction: the smallest remaining time 1 - t the predicted end point is divided by (JiT uses 0.05).
X1_MIN_REMAINING = 0.05


@dataclass(frozen=True)
class TrunkArgs:
    """The fields every family shares (stored in checkpoints as ``model_args``, with the family's own)."""
    latent_shape: tuple[int, int, int]
    text_dim: int
    max_tokens: int
    hidden_size: int
    depth: int
    head_dim: int
    patch_size: int
    mlp_ratio: float
    pos_embed: str
    text_proj_dim: int = 0  # learned projection of the text features before the model reads them; 0 = none
    prediction: str = "velocity"  # model.prediction: what the network outputs (velocity, or x1 converted to it)
    family: str = ""  # each family's args class sets its name as the default

    @classmethod
    def from_config(cls, model_cfg, latent_shape, text_dim: int, max_tokens: int, init_temperature: float = 0.07,
                    contrastive: str = "image_text", *, source: str = "text_ve", target: str = "image",
                    source_shape: tuple = (), caption_vocab: int = 0):
        """Every field of ``cls``: the data's shapes, the objective's temperature and contrastive
        variant and the task's source and target (``source_shape`` kept for image_ve alone,
        ``caption_vocab`` and ``caption_tokens`` = ``max_tokens`` for the caption target alone, so
        text-to-image's args are today's whatever the caller passes) as given, else the
        ``model_cfg`` (a ModelConfig) value, else, where that is None, the size preset's. A family
        without task fields (the cross-attention baseline) refuses any pair but text_ve -> image."""
        names = [f.name for f in dataclasses.fields(cls)]
        if (source, target) != ("text_ve", "image") and "source" not in names:
            raise ValueError(f"model.family={model_cfg.family!r} flows from noise to the image: it takes no "
                             f"task.source={source!r} / task.target={target!r} (only text_ve -> image); "
                             f"use model.family=crossflow")
        preset = PRESETS[model_cfg.preset]
        given = {"latent_shape": tuple(latent_shape), "text_dim": text_dim, "max_tokens": max_tokens,
                 "init_temperature": init_temperature, "contrastive": contrastive, "source": source,
                 "target": target, "source_shape": tuple(source_shape) if source == "image_ve" else (),
                 "caption_vocab": caption_vocab if target == "caption" else 0,
                 "caption_tokens": max_tokens if target == "caption" else 0}

        def value(name: str):
            if name in given:
                return given[name]
            v = getattr(model_cfg, name)
            return getattr(preset, name) if v is None else v

        return cls(**{name: value(name) for name in names if name != "family"})


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


class DiTTrunk(SwappableOps, nn.Module):
    """A DiT over latent patches; subclasses add their conditioning (see the module docstring)."""

    def __init__(self, args: TrunkArgs):
        super().__init__()
        C, H, W = args.latent_shape
        if H != W or H % args.patch_size:
            raise ValueError(f"latent {args.latent_shape} must be square with a side divisible by "
                             f"patch {args.patch_size}")
        self.args = args
        D = args.hidden_size
        self.grid = H // args.patch_size
        self.patch_embed = nn.Conv2d(C, D, kernel_size=args.patch_size, stride=args.patch_size)
        register_pos_embed(self, args.pos_embed, D, self.grid)
        self.t_embedder = TimestepEmbedder(D)
        self.add_condition_inputs(args)
        self.blocks = nn.ModuleList(self.make_block(args) for _ in range(args.depth))
        self.final_layer = FinalLayer(D, args.patch_size, C)
        self.initialize_weights()

    # ------------------------------------------------------------------ what a family says
    def add_condition_inputs(self, args: TrunkArgs) -> None:
        """Register the family's conditioning parameters (built between the time embedder and the blocks)."""

    def make_block(self, args: TrunkArgs) -> nn.Module:
        return DiTBlock(args.hidden_size, args.head_dim, args.mlp_ratio)

    def initialize_condition(self) -> None:
        """Initialize the family's conditioning parameters (after DiT's init of the rest)."""

    # ------------------------------------------------------------------ shared
    def initialize_weights(self) -> None:
        """DiT's initialization: xavier Linears, the patch embedding like a Linear, N(0, 0.02) time
        embedder, and adaLN-Zero: every block's modulation and the final layer start at zero, so each
        block is the identity and the velocity starts at zero. Then the family's own parameters."""
        def xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.apply(xavier)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed.data.copy_(sincos_2d(self.args.hidden_size, self.grid)[None])
        for lin in (self.t_embedder.mlp[0], self.t_embedder.mlp[2]):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        self.initialize_condition()

    def embed_patches(self, x_t: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> patch tokens with their position embedding (B, T, D)."""
        return self.patch_embed(x_t).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)

    def as_velocity(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The network's output (B, C, H, W) as a velocity: itself, or for ``prediction="x1"`` the
        velocity (x1_hat - x_t) / (1 - t) that carries x_t to the predicted end point x1_hat in the
        remaining time, 1 - t clamped at X1_MIN_REMAINING (JiT's x-prediction with the v-loss). That
        is the flow-matching target z1 - (1 - sigma_min) z0 for sigma_min = 0; the objective's
        default 1e-5 moves it by about 1e-5 of itself, far below what the network resolves."""
        if self.args.prediction == "velocity":
            return out
        remaining = (1.0 - t).clamp(min=X1_MIN_REMAINING).view(-1, *([1] * (out.dim() - 1))).to(out.dtype)
        return (out - x_t) / remaining

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        B, p, g, C = x.shape[0], self.args.patch_size, self.grid, self.args.latent_shape[0]
        x = x.view(B, g, g, p, p, C)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(B, C, g * p, g * p)

    def per_sample_params(self) -> int:
        """Parameters run once per sample, not per token: the time embedder and every adaLN modulation."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if "adaLN_modulation" in name or name.startswith("t_embedder"))
