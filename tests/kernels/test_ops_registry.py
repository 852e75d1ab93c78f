"""The `kernels` package surface: no import-time side effects, get_ops backends, the ops' files,
and a DiT-style block giving the same loss and gradients with either backend."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference

REPO = Path(__file__).resolve().parents[2]
OPS = ("attention", "flow_matching_loss", "interpolate", "modulate", "gated_residual")


def run_python(code: str, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in env_changes}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)


def test_import_has_no_side_effects_and_no_version():
    """transformers probes a top-level `kernels`: importing ours must be inert."""
    proc = run_python(
        "import sys, kernels\n"
        "assert 'torch' not in sys.modules and 'triton' not in sys.modules, 'heavy import'\n"
        "assert not hasattr(kernels, '__version__')\n"
        "assert not any(m.startswith('kernels.') for m in sys.modules), sorted(sys.modules)\n")
    assert proc.returncode == 0, proc.stderr


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    proc = run_python("import kernels; kernels.get_ops('triton', 'cpu')", TRITON_INTERPRET=None)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr


def test_get_ops_backends(device):
    torch_ops = kernels.get_ops("torch", device)
    assert torch_ops.backend == "torch"
    assert all(getattr(torch_ops, op) is getattr(reference, op) for op in OPS)
    auto = kernels.get_ops("auto", device)
    if device.type == "cuda":  # per op, from kernels/auto_table.json (tests/kernels/test_auto_table.py)
        assert auto.backend == "auto" and set(auto.implementations.values()) <= {"measured", "torch"}
    else:
        assert auto.backend == "torch"
    triton_ops = kernels.get_ops("triton", device)  # CPU: the conftest set TRITON_INTERPRET=1
    assert triton_ops.backend == "triton"
    with pytest.raises(ValueError, match="backend"):
        kernels.get_ops("cuda", device)


def test_compose_ops_picks_each_op(device):
    ops = kernels.compose_ops({"attention": "cudnn", "modulate": "triton"}, device)
    assert ops.implementations == {"attention": "cudnn", "flow_matching_loss": "torch", "interpolate": "torch",
                                   "modulate": "triton", "gated_residual": "torch"}
    q = torch.randn(2, 3, 9, 16, device=device)
    torch.testing.assert_close(ops.attention(q, q, q), reference.attention(q, q, q))
    by_length = kernels.compose_ops({"attention": "by-length"}, device)
    assert by_length.implementations["attention"] == "by-length"
    for n in (9, kernels.BY_LENGTH_MAX_TRITON_N + 1):  # one length per side of the switch
        x = torch.randn(1, 2, n, 16, device=device)
        torch.testing.assert_close(by_length.attention(x, x, x), reference.attention(x, x, x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="modulate can't use 'cudnn'"):
        kernels.compose_ops({"modulate": "cudnn"}, device)
    with pytest.raises(ValueError, match="unknown kernel ops"):
        kernels.compose_ops({"softmax": "triton"}, device)


def test_triton_ops_are_the_functions_in_their_files():
    """get_ops("triton") hands out the functions of kernels/attention.py, flow_loss.py and
    modulation.py; the package is a plain module (its submodules are its attributes)."""
    import types

    from kernels.attention import attention
    from kernels.flow_loss import flow_matching_loss, interpolate
    from kernels.modulation import gated_residual, modulate

    triton_ops = kernels.get_ops("triton", "cuda" if torch.cuda.is_available() else "cpu")
    files = dict(attention=attention, flow_matching_loss=flow_matching_loss, interpolate=interpolate,
                 modulate=modulate, gated_residual=gated_residual)
    assert {op: getattr(triton_ops, op) for op in OPS} == files
    assert type(kernels) is types.ModuleType and isinstance(kernels.attention, types.ModuleType)
    with pytest.raises(AttributeError):
        kernels.no_such_op  # noqa: B018


def block_loss(ops, params, z0, z1, t, mask):
    """Interpolate, one adaLN attention block (identity projections), flow-matching loss."""
    x_t = ops.interpolate(z0, z1, t)  # (B, N, D)
    B, N, D = x_t.shape
    h = ops.modulate(x_t, params["shift"], params["scale"])  # (B, N, D)
    heads = h.view(B, N, 2, D // 2).transpose(1, 2)  # (B, 2, N, D/2)
    a = ops.attention(heads, heads * params["k"], heads, key_padding_mask=mask)  # (B, 2, N, D/2)
    a = a.transpose(1, 2).reshape(B, N, D)
    v_pred = ops.gated_residual(x_t, params["gate"], a)  # (B, N, D)
    return ops.flow_matching_loss(v_pred, z0, z1, weight=params["w"]).mean()


def test_block_matches_between_backends(device):
    B, N, D = 2, 33, 128
    z0, z1 = (torch.randn(B, N, D, device=device) for _ in range(2))
    t = torch.rand(B, device=device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    mask[1, 20:] = False
    base = {"shift": torch.randn(B, D), "scale": torch.randn(B, D), "gate": torch.randn(B, D),
            "k": torch.randn(D // 2), "w": torch.rand(B)}
    results = {}
    for backend in ("torch", "triton"):
        params = {k: v.to(device).requires_grad_() for k, v in base.items()}
        enc = z0.clone().requires_grad_()  # the text encoder's output trains jointly
        loss = block_loss(kernels.get_ops(backend, device), params, enc, z1, t, mask)
        loss.backward()
        results[backend] = (loss, enc.grad, *(params[k].grad for k in sorted(params)))
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
