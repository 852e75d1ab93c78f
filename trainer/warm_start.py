"""``train.init_from``: start a new run from another run's weights, e.g. the paper's 512 px stage
from its 256 px checkpoint.

The checkpoint's consolidated weights (``weights.safetensors``: the EMA) are loaded into the freshly
built model before the engine wraps it; optimizer, step and data position start fresh. Tensors of
the same shape are copied. Two kinds follow the latent size and are resized:

- learned position embeddings (1, g*g, D): bicubic interpolation over the patch grid (sin-cos ones
  are buffers, recomputed by the model for its own grid, and never stored);
- rows indexed by the latent map, (k*C*h*w, ...) -> (k*C*H*W, ...): the Text VE's head (k = 2:
  mu and logvar) and the image encoder's last layer (k = 1); bilinear interpolation of the map, so
  the resized layer first outputs the upsampled map of the old one.

The loop calls it on rank 0 only: DeepSpeed broadcasts rank 0's parameters to every rank when it
wraps the model (before ZeRO partitions them), so on a multi-node cluster the checkpoint need only
be on rank 0's node.

Anything else that differs (family, width, depth, text width, token count) fails naming the tensor
and both shapes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.checkpoint import load_weights, resolve_weights


def resize_pos_embed(old: torch.Tensor, tokens: int) -> torch.Tensor:
    """(1, g*g, D) -> (1, tokens, D), bicubic over the square grid."""
    g, G = math.isqrt(old.shape[1]), math.isqrt(tokens)
    grid = old.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # (1, D, g, g)
    grid = F.interpolate(grid, size=(G, G), mode="bicubic", align_corners=False)  # (1, D, G, G)
    return grid.permute(0, 2, 3, 1).reshape(1, G * G, -1).to(old.dtype)


def resize_latent_rows(old: torch.Tensor, old_latent: tuple, new_latent: tuple) -> torch.Tensor:
    """(k*C*h*w, *rest) -> (k*C*H*W, *rest): each row block is a latent map, resized bilinearly."""
    C, h, w = old_latent
    _, H, W = new_latent
    k = old.shape[0] // (C * h * w)
    rest = old.shape[1:]
    n = math.prod(rest)
    maps = old.reshape(k, C, h, w, n).permute(0, 4, 1, 2, 3).reshape(k * n, C, h, w).float()  # (k*n, C, h, w)
    maps = F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False)  # (k*n, C, H, W)
    out = maps.reshape(k, n, C, H, W).permute(0, 2, 3, 4, 1).reshape(k * C * H * W, *rest)
    return out.to(old.dtype)


def _is_latent_rows(old: torch.Tensor, new: torch.Tensor, old_latent: tuple, new_latent: tuple) -> bool:
    a, b = math.prod(old_latent), math.prod(new_latent)
    return (old_latent[0] == new_latent[0] and old.shape[1:] == new.shape[1:] and old.shape[0] % a == 0
            and new.shape[0] == old.shape[0] // a * b)


def init_from_checkpoint(model: nn.Module, path: str) -> list[str]:
    """Load ``path``'s weights into ``model`` (resizing what follows the latent); returns the resized names."""
    where = f"train.init_from={path}"
    state, args, _ = load_weights(resolve_weights(path))
    family = args.get("family", "crossflow")
    if family != model.args.family:
        raise ValueError(f"{where} holds a {family!r} model but model.family={model.args.family!r}")
    old_latent, new_latent = tuple(args["latent_shape"]), tuple(model.args.latent_shape)
    target = model.state_dict()
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise ValueError(f"{where} does not match this model: missing {missing[:5]}, unexpected {unexpected[:5]} "
                         f"(model.text_proj_dim, model.pos_embed, model.text_ve, objective.contrastive or the preset differ?)")
    loaded, resized = {}, []
    for name, new in target.items():
        old = state[name]
        if old.shape == new.shape:
            loaded[name] = old
        elif name.endswith("pos_embed") and old.dim() == 3 and old.shape[2] == new.shape[2]:
            loaded[name] = resize_pos_embed(old, new.shape[1])
        elif _is_latent_rows(old, new, old_latent, new_latent):
            loaded[name] = resize_latent_rows(old, old_latent, new_latent)
        else:
            raise ValueError(f"{where}: {name} is {tuple(old.shape)} in the checkpoint (latent {old_latent}) but "
                             f"{tuple(new.shape)} in this model (latent {new_latent}); only position embeddings and "
                             f"latent-sized heads are resized, the rest of model.* and data.text_dim/max_tokens "
                             f"must match")
        if old.shape != new.shape:
            resized.append(name)
    model.load_state_dict(loaded)
    return resized
