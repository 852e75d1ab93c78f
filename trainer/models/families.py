"""Model families selectable by ``model.family``: the one place that maps a config, or the args
stored in a checkpoint, to the right class, and that says how the engine and the planner see a
family from outside (as torchtitan's per-model ``parallelize`` does):

- ``blocks(model)``: the repeated blocks activation checkpointing and ``torch.compile`` wrap;
- ``block_stacks(args)``: those stacks' shapes (depth, tokens, width, heads, MLP ratio), from
  which ``crossflow plan`` counts activation memory without building anything;
- ``param_counts(model)``: parameters per component (flow transformer, Text VE or image VE,
  caption VE and decoder, ...);
- ``text_side(model)``: the modules two-stage training (objective.ve_pretrain_steps) trains first
  and then freezes; the engine puts them in their own optimizer groups.

Both families' flow networks are the DiT trunk (``crossflow/trunk.py``), and their args classes
extend its ``TrunkArgs``: ``args_cls.from_config`` resolves any family's config against the size
preset. Every family has CrossFlow's interface: ``encode_text``, ``encode_source``, ``text_condition``,
``velocity``, ``source_is_learned``, ``source_from_text``, ``flow_params``, ``flops_per_sample`` (the
baseline takes only the text_ve -> image pair). The engine knows no model internals.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from trainer.models.crossflow.baselines import CrossAttentionFM, CrossAttentionFMArgs
from trainer.models.crossflow.crossflow import CrossFlow, CrossFlowArgs


@dataclass(frozen=True)
class BlockStack:
    """A stack of identical transformer blocks as the planner counts it (per sample)."""
    name: str
    depth: int
    tokens: int  # sequence length through the stack
    width: int
    heads: int
    mlp_ratio: float
    cross_tokens: int = 0  # keys of a cross-attention in every block (the baseline's text), 0 = none
    checkpointed: bool = True  # wrapped by activation checkpointing when train.activation_checkpointing


@dataclass(frozen=True)
class Family:
    model_cls: type[nn.Module]
    args_cls: type  # a TrunkArgs: ``args_cls.from_config`` resolves a config against the size preset
    blocks: Callable[[nn.Module], list[nn.Module]]
    block_stacks: Callable[[object], list[BlockStack]]
    param_counts: Callable[[nn.Module], dict[str, int]]
    text_side: Callable[[nn.Module], list[nn.Module]]  # what objective.ve_pretrain_steps trains first


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- CrossFlow
def _crossflow_blocks(model: CrossFlow) -> list[nn.Module]:
    text = [] if model.text_ve is None else list(model.text_ve.blocks)
    caption = [] if model.caption is None else [*model.caption.ve.blocks, *model.caption.decoder.blocks]
    return [*model.flow.blocks, *text, *caption]


def _crossflow_stacks(a: CrossFlowArgs) -> list[BlockStack]:
    image_tokens = 1 + (a.latent_shape[1] // a.patch_size) * (a.latent_shape[2] // a.patch_size)  # + indicator
    ve_head_dim = min(64, a.text_ve_width)  # TextVE's default head width (the caption VE's and decoder's too)
    ve_heads = a.text_ve_width // ve_head_dim
    stacks = [BlockStack("flow transformer", a.depth, image_tokens, a.hidden_size, a.hidden_size // a.head_dim,
                         a.mlp_ratio)]
    if a.source == "text_ve":
        stacks.append(BlockStack("Text VE", a.text_ve_depth, a.max_tokens, a.text_ve_width, ve_heads, 4.0))
    if a.target == "caption":
        latent_pixels = a.latent_shape[1] * a.latent_shape[2]
        stacks += [BlockStack("caption VE", a.text_ve_depth, a.max_tokens, a.text_ve_width, ve_heads, 4.0),
                   BlockStack("caption decoder", a.text_ve_depth, latent_pixels + a.caption_tokens, a.text_ve_width,
                              ve_heads, 4.0)]
    return stacks  # (the image VE is convolutions, no block stack)


def _crossflow_params(model: CrossFlow) -> dict[str, int]:
    counts = {"flow transformer": _count(model.flow)}
    if model.text_ve is not None:
        counts |= {"Text VE": _count(model.text_ve), "text down-projection": _count(model.text_proj)}
    if model.image_ve is not None:
        counts["image VE"] = _count(model.image_ve)
    if model.image_encoder is not None:
        counts["image encoder"] = _count(model.image_encoder)
    if model.args.contrastive != "image_text":  # the ablations' head in place of the image encoder
        counts["text-feature head"] = _count(model.text_feature_embedder) + _count(model.text_feature_decoder)
    if model.caption is not None:
        counts |= {"caption VE": _count(model.caption.ve) + _count(model.caption.text_proj),
                   "caption decoder": _count(model.caption.decoder)}
    return counts


def _crossflow_text_side(model: CrossFlow) -> list[nn.Module]:
    """Text-to-image's text side; none for other sources (objective.ve_pretrain_steps is text_ve's)."""
    if model.text_ve is None:
        return []
    return [m for m in (model.text_proj, model.text_ve, model.image_encoder, model.text_feature_embedder,
                        model.text_feature_decoder) if m is not None]


# ----------------------------------------------------------------------------- cross-attention baseline
def _baseline_blocks(model: CrossAttentionFM) -> list[nn.Module]:
    return list(model.blocks)


def _baseline_stacks(a: CrossAttentionFMArgs) -> list[BlockStack]:
    image_tokens = (a.latent_shape[1] // a.patch_size) * (a.latent_shape[2] // a.patch_size)
    return [BlockStack("flow transformer", a.depth, image_tokens, a.hidden_size, a.hidden_size // a.head_dim,
                       a.mlp_ratio, cross_tokens=a.max_tokens)]


def _baseline_params(model: CrossAttentionFM) -> dict[str, int]:
    proj = _count(model.text_proj)
    return {"flow transformer": _count(model) - proj, "text down-projection": proj}


def _baseline_text_side(model: CrossAttentionFM) -> list[nn.Module]:
    return []  # no Text VE: two-stage training does not apply (config validation refuses it)


FAMILIES: dict[str, Family] = {
    "crossflow": Family(CrossFlow, CrossFlowArgs, _crossflow_blocks, _crossflow_stacks, _crossflow_params,
                        _crossflow_text_side),
    "cross_attention_fm": Family(CrossAttentionFM, CrossAttentionFMArgs, _baseline_blocks, _baseline_stacks,
                                 _baseline_params, _baseline_text_side),
}


def family_of(model_or_args) -> Family:
    """The family of a built model or of its args."""
    args = getattr(model_or_args, "args", model_or_args)
    return FAMILIES[args.family]


def wrapped_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks activation checkpointing and torch.compile wrap, as the model's family says."""
    return family_of(model).blocks(model)


def text_side_modules(model: nn.Module) -> list[nn.Module]:
    """The text side two-stage training trains first and then freezes (the Text VE, its input
    projection and the alignment head), as the model's family says; the rest is the flow."""
    return family_of(model).text_side(model)


def resolve_model_args(model_cfg, latent_shape, text_dim: int, max_tokens: int, init_temperature: float = 0.07,
                       contrastive: str = "image_text", *, source: str = "text_ve", target: str = "image",
                       source_shape: tuple = (), caption_vocab: int = 0):
    """The args of ``model_cfg.family`` at its preset, with the config's overrides (``contrastive``:
    objective.contrastive, which alignment head CrossFlow builds) and the task's pair (``source``,
    ``target``: task.source, task.target; ``source_shape``: image_ve's input image (3, H, W);
    ``caption_vocab``: the caption target's vocabulary size). ``latent_shape`` is the flow's."""
    if model_cfg.family not in FAMILIES:
        raise ValueError(f"model.family must be one of {list(FAMILIES)}, got {model_cfg.family!r}")
    return FAMILIES[model_cfg.family].args_cls.from_config(model_cfg, latent_shape, text_dim, max_tokens,
                                                           init_temperature, contrastive, source=source,
                                                           target=target, source_shape=source_shape,
                                                           caption_vocab=caption_vocab)


def model_from_args(args) -> nn.Module:
    """Build the model for an args dataclass, or for the dict a checkpoint stores
    (``weights.pt``'s ``model_args``; one without ``family`` is CrossFlow)."""
    if dataclasses.is_dataclass(args):
        args = dataclasses.asdict(args)
    args = {**args, "latent_shape": tuple(args["latent_shape"])}
    if "source_shape" in args:  # a list once through JSON
        args["source_shape"] = tuple(args["source_shape"])
    family = args.setdefault("family", "crossflow")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {list(FAMILIES)}")
    f = FAMILIES[family]
    return f.model_cls(f.args_cls(**args))
