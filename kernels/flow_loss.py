"""Fused flow-matching loss and interpolation (rectified flow with sigma_min), fwd and bwd.

With c = 1 - sigma_min and M = numel / B elements per sample:

    flow_matching_loss:  L_b = weight_b / M * sum_i (v_i - (z1_i - c z0_i))^2        -> (B,) fp32
        backward, g_b = dL_b * weight_b * 2 / M, r = v - (z1 - c z0):
            dv = g_b r,   dz0 = c g_b r,   dz1 = -g_b r
    interpolate:         x_t = (1 - c t_b) z0 + t_b z1
        backward: dz0 = (1 - c t_b) g,   dz1 = t_b g,   dt_b = sum_i g_i (z1_i - c z0_i)

Memory traffic (E = elements of one input, s = bytes per element):
    loss fwd: reads v, z0, z1 once (3 E s), writes B * ceil(M / BLOCK) fp32 partial sums; eager
        PyTorch also writes and re-reads the target, the difference and its square in fp32
        (about 3 E s + 6 E * 4 bytes more).
    loss bwd: reads v, z0, z1 (3 E s), writes only the gradients that are needed (<= 3 E s).
    interpolate fwd: reads z0, z1, writes x_t (3 E s); bwd: reads g (and z0, z1 only when t
        needs a gradient), writes dz0, dz1.
The target z1 - c z0 is never materialized. Arithmetic is fp32 whatever the input dtype.

The per-sample weight multiplies the (B,) result outside the kernel (a (B,) op), so autograd
gives its gradient too. Timings (H100 SXM, bf16, latent 64x4x32x32, forward+backward GPU time,
bench/kernels.py, 2026-11-25): loss 14 us (eager 44, torch.compile 9); interpolate 12 us (eager 22,
compiled 10.5). At these sizes a launch from Python costs more than the kernel (0.3-0.6 ms per
forward+backward through autograd); both run once per training step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, check_launchable, interpret_enabled, new_output

_INTERPRETED = interpret_enabled()
# Elements per program. Bandwidth-bound: 4096 fp32 per program with 8 warps is a common
# choice on NVIDIA parts; the interpreter prefers large blocks too.
_BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _fm_loss_fwd_kernel(V, Z0, Z1, PARTIAL, M, n_blocks, c, BLOCK: tl.constexpr):
    """PARTIAL[b, j] = sum over block j of sample b of (v - (z1 - c z0))^2, fp32."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M
    base = b.to(tl.int64) * M
    v = tl.load(V + base + offs, mask=inb, other=0.0).to(tl.float32)
    z0 = tl.load(Z0 + base + offs, mask=inb, other=0.0).to(tl.float32)
    z1 = tl.load(Z1 + base + offs, mask=inb, other=0.0).to(tl.float32)
    r = v - (z1 - c * z0)
    tl.store(PARTIAL + b * n_blocks + j, tl.sum(r * r, 0))


@triton.jit
def _fm_loss_bwd_kernel(V, Z0, Z1, G, DV, DZ0, DZ1, M, c, NEED_DV: tl.constexpr,
                        NEED_DZ0: tl.constexpr, NEED_DZ1: tl.constexpr, BLOCK: tl.constexpr):
    """G[b] = dL_b * 2 / M (fp32). Writes only the requested gradients."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M
    base = b.to(tl.int64) * M
    g = tl.load(G + b)
    v = tl.load(V + base + offs, mask=inb, other=0.0).to(tl.float32)
    z0 = tl.load(Z0 + base + offs, mask=inb, other=0.0).to(tl.float32)
    z1 = tl.load(Z1 + base + offs, mask=inb, other=0.0).to(tl.float32)
    gr = g * (v - (z1 - c * z0))
    if NEED_DV:
        tl.store(DV + base + offs, gr.to(DV.dtype.element_ty), mask=inb)
    if NEED_DZ0:
        tl.store(DZ0 + base + offs, (c * gr).to(DZ0.dtype.element_ty), mask=inb)
    if NEED_DZ1:
        tl.store(DZ1 + base + offs, (-gr).to(DZ1.dtype.element_ty), mask=inb)


@triton.jit
def _interp_fwd_kernel(Z0, Z1, T, X, M, c, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M
    base = b.to(tl.int64) * M
    t = tl.load(T + b).to(tl.float32)
    z0 = tl.load(Z0 + base + offs, mask=inb, other=0.0).to(tl.float32)
    z1 = tl.load(Z1 + base + offs, mask=inb, other=0.0).to(tl.float32)
    x = (1.0 - c * t) * z0 + t * z1
    tl.store(X + base + offs, x.to(X.dtype.element_ty), mask=inb)


@triton.jit
def _interp_bwd_kernel(G, Z0, Z1, T, DZ0, DZ1, DT_PARTIAL, M, n_blocks, c,
                       NEED_DZ0: tl.constexpr, NEED_DZ1: tl.constexpr, NEED_DT: tl.constexpr,
                       BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = tl.program_id(1)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    inb = offs < M
    base = b.to(tl.int64) * M
    t = tl.load(T + b).to(tl.float32)
    g = tl.load(G + base + offs, mask=inb, other=0.0).to(tl.float32)
    if NEED_DZ0:
        tl.store(DZ0 + base + offs, ((1.0 - c * t) * g).to(DZ0.dtype.element_ty), mask=inb)
    if NEED_DZ1:
        tl.store(DZ1 + base + offs, (t * g).to(DZ1.dtype.element_ty), mask=inb)
    if NEED_DT:
        z0 = tl.load(Z0 + base + offs, mask=inb, other=0.0).to(tl.float32)
        z1 = tl.load(Z1 + base + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(DT_PARTIAL + b * n_blocks + j, tl.sum(g * (z1 - c * z0), 0))


def _flat(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> contiguous (B, M); a view when x is already contiguous."""
    return x.reshape(x.shape[0], -1).contiguous()


def _check_same_shape(op: str, *tensors: torch.Tensor) -> None:
    shape = tensors[0].shape
    if any(t.shape != shape for t in tensors) or len(shape) < 1:
        raise ValueError(f"kernels.{op}: inputs must share one (B, ...) shape, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    check_launchable(op, _INTERPRETED, *tensors)


class FlowMatchingLossFunction(torch.autograd.Function):
    """Unweighted per-sample MSE against z1 - (1 - sigma_min) z0. Saves only the inputs."""

    @staticmethod
    def forward(ctx, v_pred, z0, z1, sigma_min: float):
        _check_same_shape("flow_matching_loss", v_pred, z0, z1)
        v2, z02, z12 = _flat(v_pred), _flat(z0), _flat(z1)  # (B, M)
        B, M = v2.shape
        n_blocks = cdiv(M, _BLOCK)
        partial = new_output((B, n_blocks), torch.float32, v2.device)
        c = 1.0 - sigma_min
        _fm_loss_fwd_kernel[(B, n_blocks)](v2, z02, z12, partial, M, n_blocks, c,
                                           BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        ctx.save_for_backward(v2, z02, z12)
        ctx.c = c
        ctx.shape = v_pred.shape
        ctx.dtypes = (v_pred.dtype, z0.dtype, z1.dtype)
        return partial.sum(dim=1) / M  # (B,) fp32; deterministic (no atomics)

    @staticmethod
    def backward(ctx, dloss):
        v2, z02, z12 = ctx.saved_tensors
        B, M = v2.shape
        need_dv, need_dz0, need_dz1 = ctx.needs_input_grad[:3]
        g = (dloss.float() * (2.0 / M)).contiguous()  # (B,)
        grads = [new_output((B, M), dt, v2.device) if need else None
                 for need, dt in zip((need_dv, need_dz0, need_dz1), ctx.dtypes)]
        dummy = v2  # never written when the matching NEED_* flag is False
        _fm_loss_bwd_kernel[(B, cdiv(M, _BLOCK))](
            v2, z02, z12, g, *(t if t is not None else dummy for t in grads), M, ctx.c,
            NEED_DV=need_dv, NEED_DZ0=need_dz0, NEED_DZ1=need_dz1, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        dv, dz0, dz1 = (t.view(ctx.shape) if t is not None else None for t in grads)
        return dv, dz0, dz1, None


class InterpolateFunction(torch.autograd.Function):
    """x_t = (1 - c t) z0 + t z1; saves z0 and z1 only when t needs a gradient."""

    @staticmethod
    def forward(ctx, z0, z1, t, sigma_min: float):
        _check_same_shape("interpolate", z0, z1)
        check_launchable("interpolate", _INTERPRETED, z0, t)
        if t.shape != (z0.shape[0],):
            raise ValueError(f"kernels.interpolate: t must be (B,) = ({z0.shape[0]},), got {tuple(t.shape)}")
        z02, z12 = _flat(z0), _flat(z1)  # (B, M)
        B, M = z02.shape
        t32 = t.detach().to(z0.dtype).float().contiguous()  # the reference rounds t to z0's dtype
        out_dtype = torch.promote_types(z0.dtype, z1.dtype)
        x = new_output((B, M), out_dtype, z02.device)
        c = 1.0 - sigma_min
        _interp_fwd_kernel[(B, cdiv(M, _BLOCK))](z02, z12, t32, x, M, c, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        ctx.c = c
        ctx.shape = z0.shape
        ctx.dtypes = (z0.dtype, z1.dtype, t.dtype)
        ctx.save_for_backward(t32, *((z02, z12) if ctx.needs_input_grad[2] else ()))
        return x.view(z0.shape)

    @staticmethod
    def backward(ctx, dx):
        t32, *zs = ctx.saved_tensors
        g = _flat(dx)  # (B, M)
        B, M = g.shape
        need_dz0, need_dz1, need_dt = ctx.needs_input_grad[:3]
        n_blocks = cdiv(M, _BLOCK)
        dz0 = new_output((B, M), ctx.dtypes[0], g.device) if need_dz0 else None
        dz1 = new_output((B, M), ctx.dtypes[1], g.device) if need_dz1 else None
        dt_partial = new_output((B, n_blocks), torch.float32, g.device) if need_dt else None
        z02, z12 = zs if need_dt else (g, g)
        _interp_bwd_kernel[(B, n_blocks)](
            g, z02, z12, t32, dz0 if need_dz0 else g, dz1 if need_dz1 else g,
            dt_partial if need_dt else t32, M, n_blocks, ctx.c,
            NEED_DZ0=need_dz0, NEED_DZ1=need_dz1, NEED_DT=need_dt, BLOCK=_BLOCK, num_warps=_NUM_WARPS)
        dt = dt_partial.sum(dim=1).to(ctx.dtypes[2]) if need_dt else None
        return (dz0.view(ctx.shape) if need_dz0 else None,
                dz1.view(ctx.shape) if need_dz1 else None, dt, None)


def flow_matching_loss(v_pred: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor,
                       sigma_min: float = 1e-5, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample MSE between v_pred and the target z1 - (1 - sigma_min) z0. Returns (B,) fp32
    (times ``weight`` (B,) if given). Gradients flow to v_pred, z0, z1 and weight."""
    per_sample = FlowMatchingLossFunction.apply(v_pred, z0, z1, float(sigma_min))  # (B,)
    if weight is not None:
        per_sample = per_sample * weight
    return per_sample


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor,
                sigma_min: float = 1e-5) -> torch.Tensor:
    """x_t = (1 - (1 - sigma_min) t) z0 + t z1, with t of shape (B,). Gradients to z0, z1, t."""
    return InterpolateFunction.apply(z0, z1, t, float(sigma_min))
