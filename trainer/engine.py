"""The training engine: parameters, optimizer, LR schedule, EMA, and one optimizer step.

``LocalEngine`` runs in one process (CPU or one GPU). The loop only talks to the engine's
interface (``forward context``, ``backward``, ``step``, ``state_dict``), so a distributed engine
slots in without touching the loop.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

NO_DECAY_NAMES = ("indicator", "pos_embed", "logit_scale")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings and the indicator vectors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(optim_cfg, total_steps: int):
    """Multiplier of the peak LR at step s: linear warm-up, then constant or cosine."""
    warmup = optim_cfg.warmup_steps

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim_cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        lo = optim_cfg.min_lr_ratio
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def build_optimizer(model: nn.Module, optim_cfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(param_groups(model, optim_cfg.weight_decay), lr=optim_cfg.lr,
                             betas=tuple(optim_cfg.betas), eps=optim_cfg.eps)


class EMA:
    """Exponential moving average of every parameter (fp32 shadow), with the usual warm-up
    min(decay, (1 + n) / (10 + n)) so early EMA weights are not dominated by the random init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for n, v in state["shadow"].items():
            self.shadow[n].copy_(v)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


class LocalEngine:
    """Single-process engine: AdamW + warm-up schedule + grad clipping + EMA."""

    def __init__(self, model: nn.Module, optim_cfg, train_cfg, device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.optimizer = build_optimizer(model, optim_cfg)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim_cfg, train_cfg.steps))
        self.grad_clip = optim_cfg.grad_clip
        self.ema = EMA(model, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
        self.precision = train_cfg.precision

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> torch.Tensor:
        """Clip, step, schedule, EMA; returns the pre-clip global grad norm (a device tensor: no sync)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return grad_norm

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])

    def ema_state_dict(self) -> dict:
        """Weights for sampling: the EMA if kept, else the live weights."""
        if self.ema is None:
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        sd = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        sd.update({k: v.clone() for k, v in self.ema.shadow.items()})
        return sd
