import torch
import torch.nn as nn

from trainer.models.crossflow.flow_transformer import CONDITIONAL
from trainer.sampling import guided_velocity, interpolate_z0, solve, z0_arithmetic


class KnownVelocity(nn.Module):
    """v = a (conditional) or b (unconditional) times f(x, t): lets CFG and the solvers be checked exactly."""

    def __init__(self, fn_cond, fn_uncond):
        super().__init__()
        self.fn_cond, self.fn_uncond, self.calls = fn_cond, fn_uncond, []

    def velocity(self, x, t, indicator):
        self.calls.append(x.shape[0])
        cond = (indicator == CONDITIONAL).view(-1, *([1] * (x.dim() - 1)))
        return torch.where(cond, self.fn_cond(x, t), self.fn_uncond(x, t))


def test_cfg_combination_one_batched_forward():
    m = KnownVelocity(lambda x, t: torch.full_like(x, 3.0), lambda x, t: torch.full_like(x, 1.0))
    x = torch.zeros(4, 2, 2, 2)
    v = guided_velocity(m, x, torch.zeros(4), cfg_scale=2.5)
    assert torch.allclose(v, torch.full_like(x, 1.0 + 2.5 * (3.0 - 1.0)))
    assert m.calls == [8]  # both branches in one forward
    m.calls.clear()
    assert torch.allclose(guided_velocity(m, x, torch.zeros(4), 1.0), torch.full_like(x, 3.0))
    assert m.calls == [4]  # s = 1: conditional only


def test_euler_exact_for_constant_velocity():
    m = KnownVelocity(lambda x, t: torch.ones_like(x), lambda x, t: torch.zeros_like(x))
    z0 = torch.randn(3, 1, 2, 2)
    assert torch.allclose(solve(m, z0, steps=7, solver="euler", cfg_scale=1.0), z0 + 1.0, atol=1e-6)


def test_heun_exact_for_velocity_linear_in_t():
    # dx/dt = 2t  ->  x(1) = x(0) + 1; Heun (trapezoid) is exact for linear v(t), Euler is not
    fn = lambda x, t: 2 * t.view(-1, 1, 1, 1).expand_as(x)  # noqa: E731
    m = KnownVelocity(fn, fn)
    z0 = torch.zeros(2, 1, 2, 2)
    heun = solve(m, z0, steps=4, solver="heun", cfg_scale=1.0)
    euler = solve(m, z0, steps=4, solver="euler", cfg_scale=1.0)
    # Heun's last step is Euler: 3 trapezoid steps then one Euler step
    ts = torch.linspace(0, 1, 5)
    expected = sum(((2 * ts[i] + 2 * ts[i + 1]) / 2 * 0.25).item() for i in range(3)) + 2 * ts[3].item() * 0.25
    assert torch.allclose(heun, torch.full_like(z0, expected), atol=1e-6)
    assert torch.allclose(euler, torch.full_like(z0, sum(2 * ts[i].item() * 0.25 for i in range(4))), atol=1e-6)


def test_interpolation_endpoints_and_midpoint():
    a, b = torch.randn(2, 3, 3), torch.randn(2, 3, 3)
    path = interpolate_z0(a, b, 5)
    assert path.shape == (5, 2, 3, 3)
    assert torch.allclose(path[0], a) and torch.allclose(path[-1], b)
    assert torch.allclose(path[2], (a + b) / 2)


def test_arithmetic_restandardizes():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(4, 8, 8, generator=g) * 2 + 1 for _ in range(3))
    z = z0_arithmetic([(1, a), (-1, b), (1, c)])
    assert abs(z.std().item() - torch.stack([a.std(), b.std(), c.std()]).mean().item()) < 1e-4
    assert abs(z.mean().item() - torch.stack([a.mean(), b.mean(), c.mean()]).mean().item()) < 1e-4
    raw = a - b + c
    assert torch.corrcoef(torch.stack([z.flatten(), raw.flatten()]))[0, 1] > 0.999  # same direction
