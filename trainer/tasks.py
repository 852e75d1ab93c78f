"""Tasks: which source makes the flow's start z0 and which target its end z1 (``task.source``,
``task.target`` in the config).

The one place that maps a registered (source, target) pair to what it reads from a batch: the
dataset's extra fields, the flow's shape, the inputs of ``model.encode_source`` and the target
latent. The objective, the loop, checkpoints and inference handle every task through these:

    text_to_image     text_ve  -> image    z0 from the caption's Text VE, z1 the image (or its VAE latent)
    super_resolution  upsample -> image    z0 the low-res image, upsampled (bicubic) into the image's space
    depth             image_ve -> depth    z0 from an image VE, z1 the depth map (1, H, W) in [-1, 1]
    captioning        image_ve -> caption  z0 from an image VE, z1 the caption VE's mean (task.caption_latent)

Adding a pair: a model part (``trainer.models.crossflow``), a row here, a config.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from trainer.config import TASK_PAIRS

TEXT_TO_IMAGE, SUPER_RESOLUTION, DEPTH, CAPTIONING = "text_to_image", "super_resolution", "depth", "captioning"


@dataclass(frozen=True)
class Task:
    name: str
    source: str  # task.source: text_ve, image_ve or upsample
    target: str  # task.target: image, depth or caption
    extras: tuple[str, ...] = ()  # what the shapes dataset adds to each sample (ShapesTextDataset extras)


_EXTRAS = {"depth": ("depth",), "caption": ("caption_ids",)}
TASKS: dict[tuple[str, str], Task] = {pair: Task(name, *pair, _EXTRAS.get(pair[1], ()))
                                      for pair, name in TASK_PAIRS.items()}


def task_of(cfg) -> Task:
    """The task a Config trains (validation has refused unregistered pairs)."""
    return TASKS[(cfg.task.source, cfg.task.target)]


def flow_shape(cfg, model_input) -> tuple[int, int, int]:
    """(C, H, W) the flow carries z0 to: the image's (pixels or latents, ``model_input``), the depth
    map's (1, H, W) or the caption latent's (task.caption_latent)."""
    target = cfg.task.target
    if target == "image":
        return tuple(model_input.latent_shape)
    if target == "depth":
        return (1, cfg.data.resolution, cfg.data.resolution)
    return tuple(int(v) for v in cfg.task.caption_latent)


def with_flow_shape(cfg, model_input):
    """``model_input`` (what the data is) with ``latent_shape`` the flow's: what the model is built
    for, the noise is drawn for and checkpoints record."""
    return replace(model_input, latent_shape=flow_shape(cfg, model_input), task=task_of(cfg).name)


def source_shape(cfg) -> tuple:
    """The image VE's input (3, H, W); () for the other sources."""
    return (3, cfg.data.resolution, cfg.data.resolution) if cfg.task.source == "image_ve" else ()


def task_model_args(cfg, latent_shape, text_dim: int, caption_vocab: int = 0):
    """The model args of ``cfg`` for its task: ``model.family`` at its preset with the config's
    overrides, the task's source and target parts (``latent_shape``: the flow's, ``flow_shape``;
    ``caption_vocab``: the caption target's vocabulary, the text encoder's). Training builds its model
    from these and ``crossflow plan`` its meta-device copy."""
    from trainer.models.families import resolve_model_args
    return resolve_model_args(cfg.model, latent_shape, text_dim, cfg.data.max_tokens,
                              cfg.objective.contrastive_init_temperature, cfg.objective.contrastive,
                              source=cfg.task.source, target=cfg.task.target, source_shape=source_shape(cfg),
                              caption_vocab=caption_vocab)


def upsampled_source(image: torch.Tensor, source_resolution: int) -> torch.Tensor:
    """Super-resolution's input at the target's size: (B, 3, H, W) in [-1, 1] -> area-downsampled to
    ``source_resolution`` -> bicubic back to H (B, 3, H, W), clamped to [-1, 1]."""
    from data_pipeline.image_ops import area_downsample, bicubic_upsample
    low = area_downsample(image, source_resolution)  # (B, 3, s, s)
    return bicubic_upsample(low, image.shape[-1])  # (B, 3, H, W)


def source_inputs(task: Task, batch: dict, codec, cfg, device) -> dict[str, torch.Tensor]:
    """What ``model.encode_source`` reads, on ``device``: text_ve {text_emb, text_mask}; image_ve
    {image}; upsample {z0} (the upsampled low-res image in the flow's space, through ``codec``)."""
    if task.source == "text_ve":
        return {"text_emb": batch["text_emb"].to(device, non_blocking=True),  # (B, L, D_text)
                "text_mask": batch["text_mask"].to(device, non_blocking=True)}  # (B, L)
    image = batch["image"].to(device, non_blocking=True)  # (B, 3, H, W)
    if task.source == "image_ve":
        return {"image": image}
    return {"z0": codec.encode(upsampled_source(image, cfg.task.source_resolution))}  # (B, C, h, w)


def target_latent(task: Task, batch: dict, codec, device) -> torch.Tensor | None:
    """z1 from the data, on ``device``: the image's (pixels or latent), the depth map (B, 1, H, W);
    None for the caption target (the model makes it from the caption: ``caption_inputs``)."""
    from trainer.models.codecs import batch_target
    if task.target == "image":
        return batch_target(batch, codec).to(device, non_blocking=True)  # (B, C, H, W)
    if task.target == "depth":
        return batch["depth"].to(device, non_blocking=True)  # (B, 1, H, W)
    return None


@dataclass
class CaptionInputs:
    """The caption target's inputs: the caption's token features (the caption VE reads them) and its
    token ids (the decoder's cross-entropy targets, padding included)."""
    emb: torch.Tensor  # (B, n, d)
    mask: torch.Tensor  # (B, n) bool
    ids: torch.Tensor  # (B, n) long


def caption_inputs(task: Task, batch: dict, device) -> CaptionInputs | None:
    """The caption target's inputs on ``device``; None for other targets."""
    if task.target != "caption":
        return None
    return CaptionInputs(batch["text_emb"].to(device, non_blocking=True),  # (B, n, d)
                         batch["text_mask"].to(device, non_blocking=True),  # (B, n)
                         batch["caption_ids"].to(device, non_blocking=True).long())  # (B, n)


def caption_autoencoder(model: torch.nn.Module) -> torch.nn.Module:
    """The model's caption autoencoder (caption VE + decoder): what task.target_pretrain_steps trains first."""
    from trainer.models.crossflow.caption import CaptionAutoencoder
    found = [m for m in model.modules() if isinstance(m, CaptionAutoencoder)]
    if len(found) != 1:
        raise ValueError(f"expected one CaptionAutoencoder in the model (task.target=caption), found {len(found)}")
    return found[0]
