"""The noise the training loop draws, for tests that call the objective directly."""
from __future__ import annotations

import torch

from trainer.objectives import Noise, draw_noise


def training_noise(cfg, z1: torch.Tensor, step: int = 0, seed: int = 0) -> Noise:
    """What trainer/loop.py draws for ``z1`` as one process's whole micro-batch at ``step``."""
    return draw_noise(cfg, seed, step, 0, z1.shape[0], 0, 1, tuple(z1.shape[1:]), z1.device)
