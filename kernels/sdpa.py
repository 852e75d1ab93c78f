"""PyTorch's fused attention with cuDNN first: the attention ``model.kernels: auto`` runs on CUDA.

Same signature and semantics as ``kernels.reference.attention`` (SDPA with a boolean key mask);
only the backend order differs: cuDNN, then flash, then memory-efficient, then math. Where cuDNN
cannot run a call (say, a mask it does not take), SDPA moves down the list.

Why (H100 SXM, bf16, B = 64, CUDA-graph GPU times, bench/kernels.py, 2026-11-25; the full
table is in bench/RESULTS.md): at the 0.95B preset's N = 257, D = 128 the cuDNN kernels beat
SDPA's flash backend and our Triton kernel forward+backward; at N = 1025 cuDNN and ours are
within a few percent of each other.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .reference import attention as _sdpa_attention

_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                SDPBackend.MATH]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal softmax attention. q, k, v: (B, H, N, D); mask (B, N), True = real token."""
    with sdpa_kernel(_CUDNN_FIRST, set_priority=True):
        return _sdpa_attention(q, k, v, key_padding_mask)  # (B, H, N, D)
