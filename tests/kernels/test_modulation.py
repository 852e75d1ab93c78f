"""kernels.modulate and kernels.gated_residual vs kernels.reference: output and every gradient."""
from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.modulation import gated_residual, modulate

CUDA = torch.cuda.is_available()
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 needs CUDA (wrong under the interpreter)")]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)]

# dtype -> (atol, rtol) against the fp32 reference on the same rounded inputs. The (B, D)
# gradients are sums over N rows, so their absolute error grows with N: rtol carries them.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (6e-2, 3e-2),
}
B = 3
# (N, D): one token; 77 text tokens with a non-power-of-two width; 257 tokens (several row
# chunks in the backward); a DiT-XL-like width of 1152.
SHAPES = [(1, 64), (77, 96), (257, 128), (130, 1152)]


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def check(op, ref_op, inputs, dtype, names):
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = op(*leaves)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_leaves = [x.float().requires_grad_() for x in inputs]
    ref = ref_op(*ref_leaves)
    ref.backward(dout.float())
    assert out.shape == ref.shape
    assert_close(out, ref, dtype, "out")
    for name, a, e in zip(names, leaves, ref_leaves):
        assert a.grad.dtype == a.dtype
        assert_close(a.grad, e.grad, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dt: str(dt).removeprefix("torch."))
@pytest.mark.parametrize("n, d", SHAPES)
def test_modulate_matches_reference(n, d, dtype, device):
    x = 2 * torch.randn(B, n, d, device=device, dtype=dtype) + 0.5  # non-zero mean, non-unit variance
    shift, scale = (torch.randn(B, d, device=device, dtype=dtype) for _ in range(2))
    check(modulate, reference.modulate, (x, shift, scale), dtype, ("dx", "dshift", "dscale"))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dt: str(dt).removeprefix("torch."))
@pytest.mark.parametrize("n, d", SHAPES)
def test_gated_residual_matches_reference(n, d, dtype, device):
    x, y = (torch.randn(B, n, d, device=device, dtype=dtype) for _ in range(2))
    gate = torch.randn(B, d, device=device, dtype=dtype)
    check(gated_residual, reference.gated_residual, (x, gate, y), dtype, ("dx", "dgate", "dy"))


def test_mixed_dtypes_promote_like_the_reference(device):
    """fp16 tokens with fp32 adaLN vectors: the output is fp32, as in eager PyTorch."""
    x = torch.randn(B, 77, 64, device=device, dtype=torch.float16)
    shift, scale, gate = (torch.randn(B, 64, device=device) for _ in range(3))
    assert modulate(x, shift, scale).dtype == reference.modulate(x, shift, scale).dtype == torch.float32
    assert gated_residual(x, gate, x).dtype == reference.gated_residual(x, gate, x).dtype == torch.float32
    check(modulate, reference.modulate, (x, shift, scale), torch.float16, ("dx", "dshift", "dscale"))


def test_gated_residual_frozen_gate(device):
    """Only x needs a gradient: dx is the upstream gradient; nothing else is launched."""
    x, y = (torch.randn(B, 9, 64, device=device) for _ in range(2))
    gate = torch.randn(B, 64, device=device)
    x.requires_grad_()
    out = gated_residual(x, gate, y)
    dout = torch.randn_like(out)
    out.backward(dout)
    torch.testing.assert_close(x.grad, dout)


def test_modulate_rejects_bad_shapes(device):
    x = torch.randn(B, 5, 64, device=device)
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        modulate(x, torch.randn(B, 32, device=device), torch.randn(B, 64, device=device))
