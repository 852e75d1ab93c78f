import math

import pytest
import torch

from kernels import reference
from trainer.config import ObjectiveConfig
from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL
from trainer.objectives import contrastive_loss, draw_noise, kl_divergence, sample_time, unconditional_partners


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
    """draw_noise (what training draws) makes a sample unconditional with probability uncond_prob."""
    noise = draw_noise(ObjectiveConfig(uncond_prob=0.1), 0, 0, 0, 4000, 0, 1, (1, 1, 1), "cpu")
    assert set(noise.indicator.unique().tolist()) == {CONDITIONAL, UNCONDITIONAL}
    assert abs((noise.indicator == UNCONDITIONAL).float().mean().item() - 0.1) < 0.02  # 4 sigma


def test_unconditional_swap():
    ind = torch.tensor([1, 0, 1, 0, 0, 1, 0, 1])
    uncond = ind == UNCONDITIONAL
    source = unconditional_partners(uncond, torch.rand(8))
    assert torch.equal(source[~uncond], (~uncond).nonzero().flatten())  # conditional targets untouched
    assert sorted(source[uncond].tolist()) == uncond.nonzero().flatten().tolist()  # a permutation among uncond
    assert (source[uncond] != uncond.nonzero().flatten()).all()  # none keeps its own image
    one = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1]) == UNCONDITIONAL
    assert torch.equal(unconditional_partners(one, torch.rand(8)), torch.arange(8))  # a single one cannot swap


def test_ranks_draw_what_one_process_draws():
    """Noise is keyed by the sample's place in the global batch: 2 ranks' draws, put together, are
    one process's draws for the same global batch (what the golden-number tests rely on)."""
    cfg = ObjectiveConfig(uncond_prob=0.5)
    one = draw_noise(cfg, 3, 7, 8, 8, 0, 1, (2, 2, 2), "cpu")
    ranks = [draw_noise(cfg, 3, 7, 8, 4, r, 2, (2, 2, 2), "cpu") for r in (0, 1)]
    place = torch.tensor([i * 2 + r for r in (0, 1) for i in range(4)])  # the global position of rank-major rows
    assert torch.equal(torch.cat([n.t for n in ranks]), one.t[place])
    assert torch.equal(torch.cat([n.indicator for n in ranks]), one.indicator[place])
    assert torch.equal(torch.cat([n.eps for n in ranks]), one.eps[place])


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0])])
def test_flow_loss_weight(weight):
    v, z0, z1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    base = ((v - (z1 - (1 - 1e-5) * z0)) ** 2).flatten(1).mean(1)
    got = reference.flow_matching_loss(v, z0, z1, 1e-5, weight)
    assert torch.allclose(got, base * (1 if weight is None else weight))
