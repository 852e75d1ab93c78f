"""kernels.attention vs kernels.reference.attention (SDPA): output and dq, dk, dv.

The reference runs in fp32 on the same (already rounded) inputs. Under the CPU interpreter a
subset of the (N, D, padding, dtype) grid runs that still covers every N and every D; on a
GPU the whole grid runs, bf16 and N=1025 included.
"""
from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.attention import attention

B, H = 3, 5
CUDA = torch.cuda.is_available()
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 needs CUDA (wrong under the interpreter)")]

# dtype -> (atol, rtol) against the fp32 reference, for the output and every gradient.
TOLERANCES = {
    torch.float32: (2e-4, 2e-4),
    torch.float16: (5e-3, 1e-2),
    torch.bfloat16: (3e-2, 3e-2),
}

# (N, D, padded, dtype) under the interpreter: every N and D, both dtypes, with and without padding.
INTERPRETER_CASES = [
    (1, 64, False, torch.float32),
    (1, 128, True, torch.float16),
    (77, 64, True, torch.float16),
    (77, 128, True, torch.float32),
    (129, 64, True, torch.float32),
    (129, 128, False, torch.float16),
    (257, 64, True, torch.float16),
    (257, 128, False, torch.float32),
]
GPU_CASES = [(n, d, padded, dt) for n in (1, 77, 129, 257, 1025) for d in (64, 128)
             for padded in (False, True) for dt in (torch.float32, torch.float16)]


def _params():
    cases = GPU_CASES if CUDA else INTERPRETER_CASES
    params = [pytest.param(*c, id=f"N{c[0]}-D{c[1]}-{'pad' if c[2] else 'full'}-{str(c[3])[6:]}") for c in cases]
    for n, d in ((77, 64), (257, 128), (1025, 64)):
        params.append(pytest.param(n, d, True, torch.bfloat16, id=f"N{n}-D{d}-pad-bfloat16", marks=gpu_only))
    return params


def random_mask(n: int, device) -> torch.Tensor:
    """(B, n) True = real token; row 0 full length, the others random lengths >= 1."""
    lengths = torch.randint(1, n + 1, (B,), device=device)
    lengths[0] = n
    return torch.arange(n, device=device)[None, :] < lengths[:, None]  # (B, n)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def run_both(q, k, v, mask, dout):
    """Triton and fp32-reference outputs and (dq, dk, dv) for the same inputs."""
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, key_padding_mask=mask)
    out.backward(dout)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    ref = reference.attention(*ref_leaves, key_padding_mask=mask)
    ref.backward(dout.float())
    return (out, *(x.grad for x in leaves)), (ref, *(x.grad for x in ref_leaves))


@pytest.mark.parametrize("n, d, padded, dtype", _params())
def test_attention_matches_reference(n, d, padded, dtype, device):
    q, k, v = (torch.randn(B, H, n, d, device=device, dtype=dtype) for _ in range(3))
    mask = random_mask(n, device) if padded else None
    dout = torch.randn(B, H, n, d, device=device, dtype=dtype)
    got, want = run_both(q, k, v, mask, dout)
    assert got[0].dtype == dtype and got[0].shape == (B, H, n, d)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, e, dtype, name)
    if padded:  # padded keys carry no probability, hence exactly zero dk, dv
        pad = ~mask[:, None, :, None].expand(B, H, n, d)
        assert torch.all(got[2][pad] == 0) and torch.all(got[3][pad] == 0)


def test_strided_inputs_and_gradient(device):
    """q, k, v as views of one fused (B, N, 3, H, D) projection; a non-contiguous dout."""
    n, d, dtype = 77, 64, torch.float32
    qkv = torch.randn(B, n, 3, H, d, device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, n, d), non-contiguous
    assert not q.is_contiguous()
    dout = torch.randn(B, H, d, n, device=device, dtype=dtype).transpose(-1, -2)  # (B, H, n, d)
    got, want = run_both(q, k, v, random_mask(n, device), dout)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, e, dtype, name)


def test_padded_query_rows_are_ordinary_rows(device):
    """Padding masks keys only: outputs at padded query positions equal SDPA's and their
    upstream gradient flows (the model discards them, but nothing there is undefined)."""
    n, d, dtype = 77, 64, torch.float32
    q, k, v = (torch.randn(B, H, n, d, device=device, dtype=dtype) for _ in range(3))
    mask = random_mask(n, device)
    mask[1, n // 2:] = False  # row 1 surely has padded query positions
    dout = torch.zeros(B, H, n, d, device=device, dtype=dtype)
    dout[1, :, n // 2:] = torch.randn(H, n - n // 2, d, device=device)  # gradient only from padded queries
    got, want = run_both(q, k, v, mask, dout)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, e, dtype, name)
    assert got[1][1, :, n // 2:].abs().sum() > 0  # dq at padded queries is real, not dropped


def test_batch_row_without_any_real_key_gives_zeros(device):
    """Documented behaviour: a batch row whose keys are all padding (SDPA: NaN) gives output 0
    and zero gradients; the other rows are unaffected."""
    n, d, dtype = 77, 64, torch.float32
    q, k, v = (torch.randn(B, H, n, d, device=device, dtype=dtype) for _ in range(3))
    mask = random_mask(n, device)
    mask[2] = False
    dout = torch.randn(B, H, n, d, device=device, dtype=dtype)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, key_padding_mask=mask)
    out.backward(dout)
    assert torch.all(out[2] == 0)
    for x in leaves:
        assert torch.all(x.grad[2] == 0)
    got, want = run_both(q[:2], k[:2], v[:2], mask[:2], dout[:2])
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, e, dtype, name)
    assert_close(out[:2], got[0], dtype, "out rows 0-1 with and without the empty row")


def test_long_sequence(device):
    """N = 1025 (1024 patches + the indicator token): one (b, h) keeps the interpreter quick."""
    n, d, dtype = 1025, 64, torch.float16
    q, k, v = (torch.randn(1, 1, n, d, device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn(1, 1, n, d, device=device, dtype=dtype)
    got, want = run_both(q, k, v, None, dout)
    for name, a, e in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(a, e, dtype, name)


def test_rejects_unsupported_head_dim(device):
    q = torch.randn(1, 1, 8, 80, device=device)
    with pytest.raises(ValueError, match="head dim 80"):
        attention(q, q, q)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="torch.compile launches the kernels on a GPU")
def test_under_torch_compile():
    """train.compile with the Triton attention: torch.compile traces through the autograd
    Function and launches the kernels itself (with fp64 scalars: the kernels cast them)."""
    q, k, v = (torch.randn(2, 4, 257, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    compiled = torch.compile(lambda q, k, v: attention(q, k, v).float().square().sum())
    compiled(q, k, v).backward()
    got = [x.grad for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    attention(q, k, v).float().square().sum().backward()
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        assert_close(a, b, torch.bfloat16, "compiled gradient")
