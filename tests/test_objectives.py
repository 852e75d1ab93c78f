import math

import pytest
import torch

from kernels import reference
from trainer.config import ObjectiveConfig
from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL
from trainer.objectives import (contrastive_loss, draw_indicator, kl_divergence, sample_time,
                                swap_unconditional_targets)


def test_interpolant_and_target_by_hand():
    z0 = torch.tensor([[1.0, 2.0]])
    z1 = torch.tensor([[3.0, -1.0]])
    t = torch.tensor([0.25])
    s = 0.1
    # x_t = (1 - (1 - s) t) z0 + t z1 = (1 - 0.225) z0 + 0.25 z1
    assert torch.allclose(reference.interpolate(z0, z1, t, s), torch.tensor([[0.775 + 0.75, 1.55 - 0.25]]))
    # target v = z1 - (1 - s) z0 = [3 - 0.9, -1 - 1.8]; loss = mean((v_pred - v)^2)
    v_pred = torch.tensor([[2.0, -3.0]])
    expected = ((2.0 - 2.1) ** 2 + (-3.0 + 2.8) ** 2) / 2
    assert torch.allclose(reference.flow_matching_loss(v_pred, z0, z1, s), torch.tensor([expected]))


def test_interpolant_endpoints():
    z0, z1 = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert torch.allclose(reference.interpolate(z0, z1, torch.zeros(3), 1e-5), z0)
    assert torch.allclose(reference.interpolate(z0, z1, torch.ones(3), 0.0), z1)


def test_kl_by_hand():
    mu = torch.tensor([[1.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)]])
    # 0.5 * [(1 + 1 - 1 - 0) + (0 + 2 - 1 - ln 2)]
    expected = 0.5 * (1.0 + 1.0 - math.log(2.0))
    assert torch.allclose(kl_divergence(mu, logvar), torch.tensor(expected))
    assert kl_divergence(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0


def test_contrastive_by_hand():
    z0 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    img = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalizes to the identity
    scale = torch.tensor(math.log(10.0))
    # logits = 10 * I; CE per row = -log(e^10 / (e^10 + e^0))
    expected = -math.log(math.exp(10) / (math.exp(10) + 1))
    assert torch.allclose(contrastive_loss(z0, img, scale), torch.tensor(expected), atol=1e-6)
    # swapping the pairs makes it large
    assert contrastive_loss(z0, img.flip(0), scale) > 9.0


def test_time_samplers_in_range():
    for sampler in ("logit_normal", "uniform"):
        t = sample_time(10_000, ObjectiveConfig(time_sampler=sampler), "cpu")
        assert t.min() > 0 and t.max() < 1
    t = sample_time(20_000, ObjectiveConfig(time_sampler="logit_normal", time_mean=1.0), "cpu")
    assert abs(torch.logit(t).mean().item() - 1.0) < 0.05


def test_indicator_rate():
    ind = draw_indicator(20_000, 0.1, "cpu")
    assert set(ind.unique().tolist()) == {CONDITIONAL, UNCONDITIONAL}
    assert abs((ind == UNCONDITIONAL).float().mean().item() - 0.1) < 0.01


def test_unconditional_swap():
    z1 = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 2, 2, 2).clone()
    ind = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1])
    out = swap_unconditional_targets(z1, ind)
    uncond = (ind == UNCONDITIONAL).nonzero().flatten()
    cond = (ind == CONDITIONAL).nonzero().flatten()
    assert torch.equal(out[cond], z1[cond])  # conditional targets untouched
    got = out[uncond, 0, 0, 0]
    assert sorted(got.tolist()) == sorted(z1[uncond, 0, 0, 0].tolist())  # a permutation among uncond
    assert (got != z1[uncond, 0, 0, 0]).all()  # none keeps its own image
    one = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1])
    assert torch.equal(swap_unconditional_targets(z1, one), z1)  # a single one cannot swap


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0])])
def test_flow_loss_weight(weight):
    v, z0, z1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    base = ((v - (z1 - (1 - 1e-5) * z0)) ** 2).flatten(1).mean(1)
    got = reference.flow_matching_loss(v, z0, z1, 1e-5, weight)
    assert torch.allclose(got, base * (1 if weight is None else weight))
