"""Fused non-causal attention with a key padding mask: FlashAttention-2 forward and backward.

    out = softmax(q k^T / sqrt(D) + bias) v,   bias[b, j] = 0 if key_padding_mask[b, j] else -inf

q, k, v: (B, H, N, D), any strides; key_padding_mask: (B, N) bool, True = real token (SDPA's
boolean-mask convention). Same semantics as ``kernels.reference.attention``.

Forward (one program per BLOCK_M queries of one (b, h)): online softmax over key blocks,
never materializing the (N, N) scores; keeps the row logsumexp (base 2) for the backward.
    HBM traffic: reads q once and k, v once per query block (N/BLOCK_M times), writes out
    and lse: ~ 2 B H N D (N / BLOCK_M + 1) elements, versus O(B H N^2) for eager attention.

Backward, non-causal (every query sees every real key, so both loops run over the whole
sequence; the Triton tutorial's backward skips blocks above the diagonal and is wrong here):
    delta_i = sum_d dO_i O_i                                   (_attn_bwd_delta_kernel)
    P_ij = exp2(S_ij log2(e) - lse_i),  dP = dO V^T,  dS = P (dP - delta_i)
    dV = P^T dO,  dK = dS^T Q / sqrt(D)                        (_attn_bwd_dkdv_kernel, per key block)
    dQ = dS K / sqrt(D)                                        (_attn_bwd_dq_kernel, per query block)
dK/dV and dQ are separate kernels, so there are no atomics and results are deterministic;
the price is computing S and dP twice.

Padding: padded keys get probability 0, hence dK = dV = 0 there. Padded *queries* are ordinary
rows (as in SDPA): their outputs and gradients are computed and match the reference.
A batch row whose keys are ALL padding has no defined softmax (SDPA returns NaN); here its
output is 0 and its q, k, v gradients are 0 (lse is stored as +inf for such rows).

Timings (H100 SXM, bf16, B = 64, H x D = 1536, forward+backward GPU time as CUDA-graph replays,
bench/kernels.py, 2026-11-25): N = 257, D = 128: 0.892 ms (102 TFLOP/s; cuDNN SDPA 1.060 ms, flash
1.308); N = 1025, D = 64: 7.20 ms (201 TFLOP/s; cuDNN 6.68); N = 1025, D = 128: 6.28 ms (230
TFLOP/s; cuDNN 5.70). ``model.kernels: auto`` therefore uses this kernel on an H100 up to the
measured 257 tokens at D = 128 in bf16 and PyTorch's SDPA elsewhere (kernels/auto_table.json);
bench/RESULTS.md has the tables.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import cdiv, check_launchable, interpret_enabled, new_output

_INTERPRETED = interpret_enabled()  # decided once: triton.jit reads it when decorating below
_LOG2E = 1.4426950408889634
# What the launcher accepts (tests/kernels/compile_variants.py compiles each for the GPU targets).
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _key_keep(KEEP, b, offs_n, N, HAS_MASK: tl.constexpr):
    """(BLOCK_N,) bool: key j is in range and (if masked) a real token."""
    keep = offs_n < N
    if HAS_MASK:
        keep = keep & (tl.load(KEEP + b * N + offs_n, mask=offs_n < N, other=0) != 0)
    return keep


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, KEEP, O, LSE,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
    H, N, qk_scale,  # qk_scale = log2(e) / sqrt(D): scores in base-2 units
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_in = offs_m < N
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=q_in[:, None], other=0.0)  # (BLOCK_M, D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        keep = _key_keep(KEEP, b, offs_n, N, HAS_MASK)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_in[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_in[:, None], other=0.0)  # (BLOCK_N, D)
        # .to(fp32): torch.compile launches user kernels with Python floats as fp64 scalars,
        # which would make the loop-carried running max fp64 (a Triton type error).
        s = (tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)  # (BLOCK_M, BLOCK_N)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen only padding so far has m_new = -inf: shift by 0 instead, so
        # exp2(-inf - 0) = 0 rather than exp2(-inf + inf) = NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    empty = l_i == 0.0  # only when every key of this batch row is padding
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))  # +inf: P = 0 in the backward
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=q_in[:, None])
    tl.store(LSE + pid_bh * N + offs_m, lse, mask=q_in)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, sob, soh, son, sod, sdb, sdh, sdn, sdd, H, N,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d O_i dO_i (fp32). Reads O and dO once, writes B H N floats."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_in = offs_m < N
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                mask=q_in[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=q_in[:, None], other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh * N + offs_m, tl.sum(o * do, 1), mask=q_in)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per BLOCK_N keys: loops over ALL query blocks (non-causal).
    Reads k, v once and q, dO, lse, delta once per key block; writes dk, dv (contiguous)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_in = offs_n < N
    keep = _key_keep(KEEP, b, offs_n, N, HAS_MASK)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_in[:, None], other=0.0)  # (BLOCK_N, D)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=n_in[:, None], other=0.0)  # (BLOCK_N, D)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q_in = offs_m < N
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=q_in[:, None], other=0.0)  # (BLOCK_M, D)
        do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                     mask=q_in[:, None], other=0.0)  # (BLOCK_M, D)
        # Out-of-range queries: lse = +inf makes their P column exactly 0.
        lse = tl.load(LSE + pid_bh * N + offs_m, mask=q_in, other=float("inf"))  # (BLOCK_M,)
        delta = tl.load(DELTA + pid_bh * N + offs_m, mask=q_in, other=0.0)  # (BLOCK_M,)
        s_t = (tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)  # (BLOCK_N, BLOCK_M)
        s_t = tl.where(keep[:, None], s_t, float("-inf"))
        p_t = tl.exp2(s_t - lse[None, :])  # P^T
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    dk *= sm_scale
    out_offs = pid_bh * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=n_in[:, None])
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=n_in[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, KEEP, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdn, sdd,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program per BLOCK_M queries: loops over ALL key blocks. Writes dq (contiguous)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_in = offs_m < N
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=q_in[:, None], other=0.0)  # (BLOCK_M, D)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd,
                 mask=q_in[:, None], other=0.0)  # (BLOCK_M, D)
    lse = tl.load(LSE + pid_bh * N + offs_m, mask=q_in, other=float("inf"))
    delta = tl.load(DELTA + pid_bh * N + offs_m, mask=q_in, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        keep = _key_keep(KEEP, b, offs_n, N, HAS_MASK)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                    mask=n_in[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=n_in[:, None], other=0.0)
        s = (tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)  # (BLOCK_M, BLOCK_N)
        s = tl.where(keep[None, :], s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq *= sm_scale
    out_offs = pid_bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DQ + out_offs, dq.to(DQ.dtype.element_ty), mask=q_in[:, None])


# Block sizes. The interpreter runs one program at a time in numpy, so big fixed blocks are
# fastest there; on a GPU the autotuner picks per (N, D, dtype) among a few FA2-style tiles.
_INTERPRETER_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}
_DELTA_BLOCK_M = 64


# fp32 inputs: tiles of at most this many scores, pipelined over at most this many stages.
_FP32_MAX_TILE = 64 * 32
_FP32_MAX_STAGES = 2


def _fp32_small_tiles(configs, named_args, **kwargs):
    """fp32 inputs use full-precision (non-tensor-core) dots, whose operands take 4 bytes and many
    registers. The compile gate (tests/kernels/compile_variants.py, sm_80 and sm_90) measured, at
    D = 128 with 3 stages: 64 x 64 forward tiles use 176 KiB of shared memory (sm_80 allows 163) and
    spill 68 KB per thread; 32 x 128 dK dV tiles 208 KiB. So fp32 gets the listed tiles of at most
    _FP32_MAX_TILE scores with at most _FP32_MAX_STAGES stages (one per kernel today)."""
    if named_args["Q"].dtype != torch.float32:
        return configs
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=min(c.num_stages, _FP32_MAX_STAGES))
            for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= _FP32_MAX_TILE]


def tuned_configs() -> dict[str, dict]:
    """What the autotuner chose so far: kernel -> {key: config} (for benchmarks' reports)."""
    if _INTERPRETED:
        return {}
    return {name: {str(k): str(v) for k, v in kernel.cache.items()}
            for name, kernel in (("fwd", _fwd), ("dkdv", _dkdv), ("dq", _dq))}


def _configs(tiles):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tiles]


if _INTERPRETED:
    _fwd, _dkdv, _dq = _attn_fwd_kernel, _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel
    _META = _INTERPRETER_BLOCKS
else:  # pragma: no cover - needs a GPU
    _KEY = ["N", "HEAD_DIM", "HAS_MASK"]
    _PRUNE = {"early_config_prune": _fp32_small_tiles}
    # (BLOCK_M, BLOCK_N, num_warps, num_stages). Every config costs a compile and a timing per
    # (N, D, mask, dtype) at first use, so the lists hold what won on an H100 (bf16, 2026-11-25:
    # fwd 64x64/4w at N=257, 128x64/8w at N=1025 D=64, 128x128/8w at D=128; dkdv 32x64/4w at
    # N=257, 32x128/4w and 64x64/4w at 1025; dq 64x32/4w at 257, 128x64/8w at 1025) plus close
    # neighbours. Small tiles matter at N = 257 (256 tokens + the indicator): the last block of
    # a 128-wide tile would be almost all padding.
    _fwd = triton.autotune(_configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                                     (64, 32, 4, 4), (128, 64, 8, 3)]),
                           key=_KEY, prune_configs_by=_PRUNE)(_attn_fwd_kernel)
    _dkdv = triton.autotune(_configs([(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3),
                                      (32, 128, 4, 3)]),
                            key=_KEY, prune_configs_by=_PRUNE)(_attn_bwd_dkdv_kernel)
    _dq = triton.autotune(_configs([(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3)]),
                          key=_KEY, prune_configs_by=_PRUNE)(_attn_bwd_dq_kernel)
    _META = {}


def _dot_precision(dtype: torch.dtype):
    # fp32 inputs: full-precision dots (TF32 would lose ~3 digits); 16-bit inputs: default.
    return "ieee" if dtype == torch.float32 else None


def _keep_mask(key_padding_mask: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    if key_padding_mask is None:
        return q  # any pointer: never read when HAS_MASK is False
    B, _, N, _ = q.shape
    if tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"key_padding_mask must be (B, N) = {(B, N)}, got {tuple(key_padding_mask.shape)}")
    return key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()  # (B, N)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one (B, H, N, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share a dtype among fp16, bf16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {q.shape[-1]} not supported; use one of {SUPPORTED_HEAD_DIMS}")
    check_launchable("attention", _INTERPRETED, q, k, v)


def attention_forward(q, k, v, keep, has_mask: bool):
    """Launch the forward. Returns out (B, H, N, D) contiguous and lse (B*H, N) fp32 (base 2)."""
    B, H, N, D = q.shape
    o = new_output((B, H, N, D), q.dtype, q.device)
    lse = new_output((B * H, N), torch.float32, q.device)
    grid = lambda meta: (cdiv(N, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd[grid](q, k, v, keep, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
               H, N, _LOG2E / math.sqrt(D), HEAD_DIM=D, HAS_MASK=has_mask,
               DOT_PRECISION=_dot_precision(q.dtype), **_META)
    return o, lse


def attention_backward(do, q, k, v, o, lse, keep, has_mask: bool):
    """Launch the three backward kernels. Returns dq, dk, dv, contiguous, in q's dtype."""
    B, H, N, D = q.shape
    delta = new_output((B * H, N), torch.float32, q.device)
    _attn_bwd_delta_kernel[(cdiv(N, _DELTA_BLOCK_M), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, N, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M)
    dq = new_output((B, H, N, D), q.dtype, q.device)
    dk = new_output((B, H, N, D), k.dtype, q.device)
    dv = new_output((B, H, N, D), v.dtype, q.device)
    sm_scale = 1.0 / math.sqrt(D)
    common = dict(HEAD_DIM=D, HAS_MASK=has_mask, DOT_PRECISION=_dot_precision(q.dtype), **_META)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    _dkdv[lambda meta: (cdiv(N, meta["BLOCK_N"]), B * H)](
        q, k, v, keep, do, lse, delta, dk, dv, *strides, H, N, sm_scale * _LOG2E, sm_scale, **common)
    _dq[lambda meta: (cdiv(N, meta["BLOCK_M"]), B * H)](
        q, k, v, keep, do, lse, delta, dq, *strides, H, N, sm_scale * _LOG2E, sm_scale, **common)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Saves q, k, v, out and the (B*H, N) fp32 logsumexp; no (N, N) tensor in either pass."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask):
        _check_inputs(q, k, v)
        has_mask = key_padding_mask is not None
        keep = _keep_mask(key_padding_mask, q)
        o, lse = attention_forward(q, k, v, keep, has_mask)
        ctx.save_for_backward(q, k, v, o, lse, keep)
        ctx.has_mask = has_mask
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, keep = ctx.saved_tensors
        dq, dk, dv = attention_backward(do, q, k, v, o, lse, keep, ctx.has_mask)
        return dq, dk, dv, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Non-causal softmax attention. q, k, v: (B, H, N, D); mask (B, N), True = real token.

    Returns a contiguous (B, H, N, D) tensor in q's dtype. See the module docstring for the
    behaviour of batch rows whose keys are all padding (output 0, not SDPA's NaN).
    """
    return FlashAttentionFunction.apply(q, k, v, key_padding_mask)
