"""Model families selectable by ``model.family``: the one place that maps a config, or the args
stored in a checkpoint, to the right class. Every family has CrossFlow's interface:
``encode_text``, ``text_condition``, ``velocity``, ``flow_params``, ``flops_per_sample``."""
from __future__ import annotations

import dataclasses

import torch.nn as nn

from trainer.models.crossflow.baselines import CrossAttentionFM, CrossAttentionFMArgs, resolve_baseline_args
from trainer.models.crossflow.crossflow import CrossFlow, CrossFlowArgs, resolve_args

# family -> (model class, args class)
FAMILIES: dict[str, tuple[type[nn.Module], type]] = {
    "crossflow": (CrossFlow, CrossFlowArgs),
    "cross_attention_fm": (CrossAttentionFM, CrossAttentionFMArgs),
}


def resolve_model_args(model_cfg, latent_shape, text_dim: int, max_tokens: int, init_temperature: float = 0.07):
    """The args of ``model_cfg.family`` at its preset, with the config's overrides."""
    if model_cfg.family == "crossflow":
        return resolve_args(model_cfg, latent_shape, text_dim, max_tokens, init_temperature)
    if model_cfg.family == "cross_attention_fm":
        return resolve_baseline_args(model_cfg, latent_shape, text_dim, max_tokens)
    raise ValueError(f"model.family must be one of {list(FAMILIES)}, got {model_cfg.family!r}")


def model_from_args(args) -> nn.Module:
    """Build the model for an args dataclass, or for the dict a checkpoint stores
    (``weights.pt``'s ``model_args``; one without ``family`` is CrossFlow)."""
    if dataclasses.is_dataclass(args):
        args = dataclasses.asdict(args)
    args = {**args, "latent_shape": tuple(args["latent_shape"])}
    family = args.setdefault("family", "crossflow")
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {list(FAMILIES)}")
    model_cls, args_cls = FAMILIES[family]
    return model_cls(args_cls(**args))
