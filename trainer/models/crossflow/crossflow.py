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

Other tasks (issue 17) are args too: ``source`` makes z0 (text_ve: the Text VE; image_ve: the
``ImageVE`` of ``sources.py``; upsample: nothing, z0 comes prepared) and ``target`` is what z1 is
(image or depth: the data's latent; caption: the latent of ``CaptionAutoencoder``, ``caption.py``).
Only the parts of the pair are built; one trunk serves every pair:
    encode_source(source dict)    -> z0, mu, logvar      (any source)
    encode_caption(emb, mask)     -> mu, logvar          (caption target: the flow's z1)
    decode_caption(z)             -> token logits        (caption target: the flow's output to text)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from trainer.models.crossflow.caption import CaptionAutoencoder
from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL, FlowTransformer
from trainer.models.crossflow.image_encoder import ImageEncoder
from trainer.models.crossflow.layers import SwappableOps
from trainer.models.crossflow.sources import ImageVE
from trainer.models.crossflow.text_heads import TextFeatureDecoder, TextFeatureEmbedder
from trainer.models.crossflow.text_ve import TextProjection, TextVE
from trainer.models.crossflow.trunk import TrunkArgs

__all__ = ["CrossFlow", "CrossFlowArgs", "resolve_args", "CONDITIONAL", "UNCONDITIONAL"]


@dataclass(frozen=True, kw_only=True)
class CrossFlowArgs(TrunkArgs):
    """Everything needed to rebuild the model (stored in checkpoints and exports): the trunk's
    size fields plus the Text VE's, the alignment head's and the task's (checkpoints without the
    ablation or task fields are the defaults: text-to-image)."""
    text_ve_width: int
    text_ve_depth: int
    text_ve_reduced_width: int
    text_ve_dropout: float
    image_encoder_width: int
    init_temperature: float = 0.07
    text_ve: str = "variational"  # model.text_ve: variational or deterministic
    contrastive: str = "image_text"  # objective.contrastive: the head built (image_text, text_text, reconstruction)
    family: str = "crossflow"  # model.family; checkpoints without it are CrossFlow
    source: str = "text_ve"  # task.source: what makes z0 (text_ve, image_ve, upsample)
    target: str = "image"  # task.target: what z1 is (image, depth, caption)
    source_shape: tuple = ()  # image_ve: the input image (3, H, W); () otherwise
    caption_vocab: int = 0  # caption target: the text encoder's vocabulary size; 0 otherwise
    caption_tokens: int = 0  # caption target: token ids per caption (data.max_tokens); 0 otherwise


# (model_cfg, latent_shape, text_dim, max_tokens, init_temperature, contrastive, *, source, target, source_shape,
#  caption_vocab)
resolve_args = CrossFlowArgs.from_config
TEXT_VE_KINDS = ("variational", "deterministic")
CONTRASTIVE_KINDS = ("image_text", "text_text", "reconstruction")
SOURCES = ("text_ve", "image_ve", "upsample")
TARGETS = ("image", "depth", "caption")
LEARNED_SOURCES = ("text_ve", "image_ve")  # a posterior to regularize (KL) and align (contrastive)


def check_task_args(args: CrossFlowArgs) -> None:
    """Refuse a source or target this model cannot build, naming the values (args may come from a
    checkpoint, so the model checks them itself)."""
    if args.source not in SOURCES or args.target not in TARGETS:
        raise ValueError(f"CrossFlow source must be one of {SOURCES} and target one of {TARGETS}, "
                         f"got {args.source!r} and {args.target!r}")
    if args.source != "text_ve" and (args.text_ve != "variational" or args.contrastive != "image_text"):
        raise ValueError(f"model.text_ve={args.text_ve!r} and objective.contrastive={args.contrastive!r}: the Text "
                         f"VE's ablations need source text_ve, got source {args.source!r} (use variational, image_text)")
    if args.source == "image_ve" and len(args.source_shape) != 3:
        raise ValueError(f"source image_ve needs source_shape (3, H, W) of its input image, got {args.source_shape!r}")


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, *, use_mean: bool = False,
                   generator: torch.Generator | None = None, eps: torch.Tensor | None = None) -> torch.Tensor:
    """z0 = mu + exp(logvar / 2) * eps, eps ~ N(0, I) from ``generator`` unless given; mu when ``use_mean``."""
    if use_mean:
        return mu
    if eps is None:
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)  # (B, C, H, W)


class CrossFlow(SwappableOps, nn.Module):
    def __init__(self, args: CrossFlowArgs):
        super().__init__()
        if args.family != "crossflow":
            raise ValueError(f"CrossFlow needs family 'crossflow', got {args.family!r}")
        if args.text_ve not in TEXT_VE_KINDS or args.contrastive not in CONTRASTIVE_KINDS:
            raise ValueError(f"CrossFlow text_ve must be one of {TEXT_VE_KINDS} and contrastive one of "
                             f"{CONTRASTIVE_KINDS}, got {args.text_ve!r} and {args.contrastive!r}")
        check_task_args(args)
        self.args = args
        # Creation order fixes the initial weights: text-to-image builds text_proj, text_ve, flow,
        # its alignment head, as it always has; other pairs build their source where the Text VE was.
        text = args.source == "text_ve"
        self.text_proj = TextProjection(args.text_dim, args.text_proj_dim) if text and args.text_proj_dim else None
        self.text_ve = TextVE(args.text_proj_dim or args.text_dim, args.max_tokens, args.latent_shape, args.text_ve_width,
                              args.text_ve_depth, args.text_ve_reduced_width, dropout=args.text_ve_dropout,
                              variational=args.text_ve == "variational") if text else None
        self.image_ve = ImageVE(args.source_shape, args.latent_shape, args.image_encoder_width) \
            if args.source == "image_ve" else None
        self.flow = FlowTransformer(args)
        # Built after the flow; only the variant's head, and only for a learned source.
        learned = self.source_is_learned
        self.image_encoder = ImageEncoder(args.latent_shape, args.image_encoder_width, args.init_temperature) \
            if learned and args.contrastive == "image_text" else None
        self.text_feature_embedder = TextFeatureEmbedder(args.text_dim, args.latent_shape, args.init_temperature) \
            if text and args.contrastive == "text_text" else None
        self.text_feature_decoder = TextFeatureDecoder(args.latent_shape, args.text_dim) \
            if text and args.contrastive == "reconstruction" else None
        self.caption = CaptionAutoencoder(args.text_dim, args.max_tokens, args.latent_shape, args.caption_vocab,
                                          args.caption_tokens, args.text_ve_width, args.text_ve_depth,
                                          args.text_ve_reduced_width, args.text_proj_dim, args.text_ve_dropout) \
            if args.target == "caption" else None

    @property
    def source_is_learned(self) -> bool:
        """z0 has a posterior (text_ve, image_ve): the KL and the contrastive term apply."""
        return self.args.source in LEARNED_SOURCES

    @property
    def source_from_text(self) -> bool:
        """z0 comes from the text (text_ve): z0 interpolation and arithmetic of prompts apply."""
        return self.args.source == "text_ve"

    def encode_source(self, source: dict, *, use_mean: bool = False, generator: torch.Generator | None = None,
                      eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The flow's start from what ``source`` reads -> z0, mu, logvar, each (B, C, H, W) (logvar
        None where there is no posterior). text_ve: ``text_emb`` (B, n, d), ``text_mask`` (B, n), as
        ``encode_text``; image_ve: ``image`` (B, 3, H, W) in [-1, 1], z0 = mu + exp(logvar / 2) * eps
        (eps from ``generator`` unless given; mu when ``use_mean``); upsample: ``z0``, already in the
        flow's space (trainer/tasks.py), returned as (z0, z0, None)."""
        needs = {"text_ve": ("text_emb", "text_mask"), "image_ve": ("image",), "upsample": ("z0",)}[self.args.source]
        missing = [k for k in needs if k not in source]
        if missing:
            raise KeyError(f"source {self.args.source!r} reads {list(needs)}; missing {missing} (got {sorted(source)})")
        if self.args.source == "text_ve":
            return self.encode_text(source["text_emb"], source["text_mask"], use_mean=use_mean, generator=generator,
                                    eps=eps)
        if self.args.source == "upsample":
            return source["z0"], source["z0"], None
        mu, logvar = self.image_ve(source["image"])  # (B, C, H, W) each
        return reparameterize(mu, logvar, use_mean=use_mean, generator=generator, eps=eps), mu, logvar

    def encode_text(self, emb: torch.Tensor, mask: torch.Tensor, *, use_mean: bool = False,
                    generator: torch.Generator | None = None,
                    eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """emb (B, n, d), mask (B, n) -> z0 = mu + exp(logvar / 2) * eps, mu, logvar; each (B, C, H, W).
        eps is drawn from ``generator`` unless given. The deterministic encoder returns (z0, z0, None):
        z0 is its output whatever ``use_mean``, ``eps`` and ``generator`` (a documented no-op: it
        has no noise to sample, so every seed of a prompt gives the same z0)."""
        if self.text_ve is None:
            raise ValueError(f"this CrossFlow's source is {self.args.source!r}: it has no Text VE "
                             f"(encode_source reads its inputs)")
        if self.text_proj is not None:
            emb = self.text_proj(emb)  # (B, n, text_proj_dim)
        mu, logvar = self.text_ve(emb, mask)
        if logvar is None:  # deterministic Text VE
            return mu, mu, None
        return reparameterize(mu, logvar, use_mean=use_mean, generator=generator, eps=eps), mu, logvar

    def encode_caption(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """caption target: the caption's token embeddings emb (B, n, d), mask (B, n) -> mu, logvar
        of its latent, each (B, C, H, W) (the flow's target is mu)."""
        return self._caption().encode(emb, mask)

    def decode_caption(self, z: torch.Tensor) -> torch.Tensor:
        """caption target: latent z (B, C, H, W) -> token logits (B, caption_tokens, caption_vocab)."""
        return self._caption().decode(z)

    def _caption(self) -> CaptionAutoencoder:
        if self.caption is None:
            raise ValueError(f"this CrossFlow's target is {self.args.target!r}: it has no caption autoencoder "
                             f"(task.target=caption)")
        return self.caption

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
        if head is None and not self.source_is_learned:
            raise ValueError(f"this CrossFlow's source {self.args.source!r} is not learned: it has no alignment "
                             f"head ({name}); the contrastive term does not apply")
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
        attention; the source, the alignment head and the caption codec excluded (small next to it
        at scale). Counted like ``CrossAttentionFM.flops_per_sample`` so the two share a compute axis."""
        a = self.args
        tokens = 1 + (a.latent_shape[1] // a.patch_size) * (a.latent_shape[2] // a.patch_size)  # + indicator
        per_sample = self.flow.per_sample_params()
        dense = 6 * ((self.flow_params() - per_sample) * tokens + per_sample)
        attention = 6 * 2 * a.depth * tokens * tokens * a.hidden_size  # QK^T and AV, fwd + bwd
        return float(dense + attention)
