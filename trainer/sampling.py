"""Sampling: solve dx/dt = v(x, t) from the text's z0 (t = 0) to the image latent (t = 1).

Classifier-free guidance through the indicator: v = v_u + s (v_c - v_u), both branches in one
batched forward. Also the paper's z0-space edits: linear interpolation between two prompts,
and arithmetic (a - b + c) re-standardized to the operands' statistics.
"""
from __future__ import annotations

import torch

from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, cfg_scale: float, cond=None) -> torch.Tensor:
    """v = v_u + s (v_c - v_u); s = 1 is plain conditional (one forward, no unconditional branch).
    ``cond``: the model's ``text_condition`` (None for CrossFlow, whose text is all in z0)."""
    B = x.shape[0]
    if cfg_scale == 1.0:
        extra = () if cond is None else (cond,)
        return model.velocity(x, t, torch.full((B,), CONDITIONAL, device=x.device), *extra)
    indicator = torch.cat([torch.full((B,), CONDITIONAL, device=x.device),
                           torch.full((B,), UNCONDITIONAL, device=x.device)])  # (2B,)
    extra = () if cond is None else (cond.repeat(2),)
    v = model.velocity(torch.cat([x, x]), torch.cat([t, t]), indicator, *extra)  # (2B, C, H, W)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def solve(model, z0: torch.Tensor, steps: int = 50, solver: str = "euler", cfg_scale: float = 1.0,
          cond=None) -> torch.Tensor:
    """Integrate from t = 0 to 1 in ``steps`` uniform steps (Euler: 1 evaluation per step; Heun: 2,
    the last step Euler). Returns the predicted image latent z1 (B, C, H, W). ``cond``: see
    ``guided_velocity``."""
    if solver not in ("euler", "heun"):
        raise ValueError(f"solver must be euler or heun, got {solver!r}")
    x = z0
    ts = torch.linspace(0.0, 1.0, steps + 1, device=z0.device)
    for i in range(steps):
        t, dt = ts[i], ts[i + 1] - ts[i]
        tb = t.expand(x.shape[0])  # (B,)
        v = guided_velocity(model, x, tb, cfg_scale, cond)
        if solver == "heun" and i < steps - 1:
            x_next = x + dt * v
            v_next = guided_velocity(model, x_next, ts[i + 1].expand(x.shape[0]), cfg_scale, cond)
            x = x + dt * 0.5 * (v + v_next)
        else:
            x = x + dt * v
    return x


@torch.no_grad()
def encode_prompts(model, text_emb: torch.Tensor, text_mask: torch.Tensor, seed: int = 0,
                   use_mean: bool = False) -> torch.Tensor:
    """z0 for each prompt, seeded: the same seed gives the same z0 (a deterministic Text VE gives
    the same z0 for every seed: it has no noise to sample)."""
    g = torch.Generator(device=text_emb.device).manual_seed(seed)
    z0, _, _ = model.encode_text(text_emb, text_mask, use_mean=use_mean, generator=g)
    return z0


def interpolate_z0(z0_a: torch.Tensor, z0_b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` points on the line from z0_a to z0_b (both (C, H, W)), endpoints included: (steps, C, H, W)."""
    if steps < 2:
        raise ValueError("interpolation needs at least 2 steps")
    alpha = torch.linspace(0.0, 1.0, steps, device=z0_a.device).view(-1, 1, 1, 1)
    return (1 - alpha) * z0_a[None] + alpha * z0_b[None]


def z0_arithmetic(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """sum(sign * z0) for (sign, z0 (C, H, W)) terms, re-standardized to the mean and std of the
    operands (a sum of several z0s has the wrong scale for the flow's starting distribution)."""
    if not terms:
        raise ValueError("arithmetic needs at least one term")
    z = sum(sign * z for sign, z in terms)
    mean = torch.stack([z.mean() for _, z in terms]).mean()
    std = torch.stack([z.std() for _, z in terms]).mean()
    return (z - z.mean()) / z.std().clamp_min(1e-6) * std + mean
