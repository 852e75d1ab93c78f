"""kernels.flow_matching_loss and kernels.interpolate vs kernels.reference: value and every gradient."""
from __future__ import annotations

import pytest
import torch

from kernels import reference
from kernels.flow_loss import flow_matching_loss, interpolate

CUDA = torch.cuda.is_available()
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="bf16 needs CUDA (wrong under the interpreter)")]
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)]

# dtype -> (atol, rtol) against the fp32 reference on the same rounded inputs.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}
# (B, ...) latents: tiny; odd; more than one 4096-element block per sample; 1 element per sample.
SHAPES = [(3, 4, 9, 7), (3, 4, 33, 33), (5, 1)]


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} ({dtype}): {m}")


def random_sigma_min() -> float:
    """Drawn from torch's generator, which the conftest seeds (and prints) per test, so a failure replays."""
    return (1e-5, 0.1)[torch.randint(2, ()).item()]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dt: str(dt).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("weighted", [False, True])
def test_flow_matching_loss_matches_reference(shape, dtype, weighted, device):
    sigma_min = random_sigma_min()
    inputs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(3)]  # v_pred, z0, z1
    weight = torch.rand(shape[0], device=device) if weighted else None
    dloss = torch.randn(shape[0], device=device)

    leaves = [x.clone().requires_grad_() for x in inputs]
    w = weight.clone().requires_grad_() if weighted else None
    loss = flow_matching_loss(*leaves, sigma_min=sigma_min, weight=w)
    loss.backward(dloss)

    ref_leaves = [x.float().requires_grad_() for x in inputs]
    ref_w = weight.clone().requires_grad_() if weighted else None
    ref = reference.flow_matching_loss(*ref_leaves, sigma_min=sigma_min, weight=ref_w)
    ref.backward(dloss)

    assert loss.shape == (shape[0],) and loss.dtype == torch.float32
    assert_close(loss, ref, dtype, "loss")
    for name, a, e in zip(("dv_pred", "dz0", "dz1"), leaves, ref_leaves):
        assert a.grad.dtype == dtype
        assert_close(a.grad, e.grad, dtype, name)
    if weighted:
        assert_close(w.grad, ref_w.grad, dtype, "dweight")


def test_flow_matching_loss_only_some_inputs_need_grad(device):
    """z1 (the VAE latent) is frozen; the mean over the batch gives an expanded (B,) gradient."""
    shape, dtype = (3, 4, 9, 7), torch.float32
    v, z0, z1 = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    v.requires_grad_()
    z0.requires_grad_()
    flow_matching_loss(v, z0, z1).mean().backward()
    rv, rz0 = v.detach().clone().requires_grad_(), z0.detach().clone().requires_grad_()
    reference.flow_matching_loss(rv, rz0, z1).mean().backward()
    assert z1.grad is None
    assert_close(v.grad, rv.grad, dtype, "dv_pred")
    assert_close(z0.grad, rz0.grad, dtype, "dz0")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda dt: str(dt).removeprefix("torch."))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("t_requires_grad", [False, True])
def test_interpolate_matches_reference(shape, dtype, t_requires_grad, device):
    sigma_min = random_sigma_min()
    z0, z1 = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    t = torch.rand(shape[0], device=device)
    dx = torch.randn(shape, device=device, dtype=dtype)

    a0, a1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    at = t.clone().requires_grad_(t_requires_grad)
    x = interpolate(a0, a1, at, sigma_min=sigma_min)
    x.backward(dx)

    r0, r1 = z0.float().requires_grad_(), z1.float().requires_grad_()
    rt = t.to(dtype).float().requires_grad_(t_requires_grad)  # the reference rounds t to z0's dtype
    ref = reference.interpolate(r0, r1, rt, sigma_min=sigma_min)
    ref.backward(dx.float())

    assert x.shape == shape and x.dtype == dtype
    assert_close(x, ref, dtype, "x_t")
    assert_close(a0.grad, r0.grad, dtype, "dz0")
    assert_close(a1.grad, r1.grad, dtype, "dz1")
    if t_requires_grad:
        assert_close(at.grad, rt.grad, torch.float32 if dtype == torch.float32 else dtype, "dt")
    else:
        assert at.grad is None


def test_interpolate_endpoints(device):
    """t = 0 gives z0 exactly; t = 1 gives z1 + sigma_min z0."""
    z0, z1 = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 3, 5, 5, device=device)
    x = interpolate(z0, z1, torch.tensor([0.0, 1.0], device=device), sigma_min=0.1)
    torch.testing.assert_close(x[0], z0[0])
    torch.testing.assert_close(x[1], z1[1] + 0.1 * z0[1])
