"""PyTorch's fused attention with cuDNN first: the "cudnn" implementation of ``compose_ops``, and
of its "by-length" attention for sequences longer than ``kernels.BY_LENGTH_MAX_TRITON_N`` (512)
tokens (``model.kernels: auto`` decides from kernels/auto_table.json instead).

Same signature and semantics as ``kernels.reference.attention`` (SDPA with a boolean key mask);
only the backend order differs: cuDNN, then flash, then memory-efficient, then math. Where cuDNN
cannot run a call (say, a mask it does not take), SDPA moves down the list.

Why (H100 SXM, bf16, B = 64, CUDA-graph GPU times, bench/kernels.py, 2026-11-25; the full
table is in bench/RESULTS.md): at N = 1025 cuDNN's forward+backward is 1.08x (D = 64) and 1.10x
(D = 128) faster than our Triton kernel and about 1.4x faster than SDPA's flash backend; at
N = 257 ours is 1.19x faster than cuDNN. PyTorch 2.11 already picked cuDNN by default there;
pinning the order keeps that choice on versions that order the backends differently.
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
