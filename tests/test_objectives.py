import math

import pytest
import torch

from kernels import reference
from trainer.config import ObjectiveConfig
from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL
from trainer.objectives import (EPS_FIRST_COUNTER, contrastive_loss, draw_noise, kl_divergence, random_bits,
                                sample_keys, swapped_targets, time_from_bits, unconditional_partners)


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
    bits = random_bits(sample_keys(0, 0, torch.arange(20_000)), torch.tensor([0]))[:, 0]
    for sampler in ("logit_normal", "uniform"):
        t = time_from_bits(bits, ObjectiveConfig(time_sampler=sampler))
        assert t.min() > 0 and t.max() < 1
    t = time_from_bits(bits, ObjectiveConfig(time_sampler="logit_normal", time_mean=1.0))
    assert abs(torch.logit(t).mean().item() - 1.0) < 0.05
    assert abs(time_from_bits(bits, ObjectiveConfig(time_sampler="uniform")).mean().item() - 0.5) < 0.01


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


def rank_major_places(micro: int, world: int, first: int = 0) -> torch.Tensor:
    """The global position of each row of a micro-step's rank-major gathered batch."""
    return torch.tensor([first + i * world + r for r in range(world) for i in range(micro)])


def simulated_targets(z1_global: torch.Tensor, draws: list, micro: int) -> torch.Tensor:
    """Each rank's swapped targets with the all-to-all done by hand (what swapped_targets receives)."""
    out = []
    for r, n in enumerate(draws):
        received = [z1_global[s * micro:(s + 1) * micro][draws[s].swap.send_rows][
            sum(draws[s].swap.send_counts[:r]):sum(draws[s].swap.send_counts[:r + 1])] for s in range(len(draws))]
        for s, rows in enumerate(received):
            assert rows.shape[0] == n.swap.recv_counts[s]
        out.append(torch.cat([z1_global[r * micro:(r + 1) * micro], *received])[n.swap.index])
    return torch.cat(out)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_draw_what_one_process_draws(world):
    """Noise is keyed by the sample's place in the global batch: N ranks' draws, put together, are
    one process's draws for the same global batch, targets swapped alike (what the golden-number
    tests rely on)."""
    cfg, micro = ObjectiveConfig(uncond_prob=0.5), 4
    one = draw_noise(cfg, 3, 7, 24, micro * world, 0, 1, (2, 2, 2), "cpu")
    ranks = [draw_noise(cfg, 3, 7, 24, micro, r, world, (2, 2, 2), "cpu") for r in range(world)]
    place = rank_major_places(micro, world)
    assert torch.equal(torch.cat([n.t for n in ranks]), one.t[place])
    assert torch.equal(torch.cat([n.indicator for n in ranks]), one.indicator[place])
    assert torch.equal(torch.cat([n.eps for n in ranks]), one.eps[place])
    z1 = torch.randn(micro * world, 3)  # by global position (offset 24)
    assert not one.swap.exchange and torch.equal(swapped_targets(z1, one.swap), z1[one.swap.index])
    assert any(n.swap.exchange for n in ranks)
    assert torch.equal(simulated_targets(z1[place], ranks, micro), z1[one.swap.index][place])


def test_draws_independent_of_the_accumulation_split():
    """t, the indicator and eps of a position do not depend on how the step is split into
    micro-steps (the unconditional partners do: they are drawn within a micro-step)."""
    cfg, world = ObjectiveConfig(uncond_prob=0.3), 2
    whole = draw_noise(cfg, 5, 2, 0, 4, 1, world, (3, 2, 2), "cpu")  # grad_accum 1, rank 1
    halves = [draw_noise(cfg, 5, 2, k * 2 * world, 2, 1, world, (3, 2, 2), "cpu") for k in (0, 1)]
    for field in ("t", "indicator", "eps"):
        assert torch.equal(torch.cat([getattr(h, field) for h in halves]), getattr(whole, field))


def test_noise_is_deterministic_and_golden():
    """The same call draws the same bits; a few draws are pinned so a change to the RNG shows."""
    cfg = ObjectiveConfig(uncond_prob=0.5)
    a, b = (draw_noise(cfg, 1234, 5, 6, 3, 0, 1, (1, 1, 2), "cpu") for _ in range(2))
    assert torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps) and torch.equal(a.swap.index, b.swap.index)
    assert torch.allclose(a.t, torch.tensor([0.41314488649368286, 0.7065049409866333, 0.49177825450897217]))
    assert a.indicator.tolist() == [CONDITIONAL, UNCONDITIONAL, UNCONDITIONAL] and a.swap.index.tolist() == [0, 2, 1]
    assert torch.allclose(a.eps.flatten(), torch.tensor([-0.7241359353065491, 0.977633535861969, 0.08684312552213669,
                                                        -1.1826674938201904, -0.18194419145584106, -0.27273908257484436]))
    assert random_bits(sample_keys(1234, 5, torch.tensor([0, 1])), torch.tensor([0, 1, 2])).tolist() == [
        [1383935394, 236048171, 1926318529], [894860749, 1382921169, 242654826]]


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x.double() / math.sqrt(2)))


def test_eps_statistics():
    """eps is N(0, 1): mean, std, a Kolmogorov-Smirnov test, and no correlation between
    neighbouring elements, positions, steps or seeds."""
    eps = draw_noise(ObjectiveConfig(), 0, 0, 0, 256, 0, 1, (4, 8, 8), "cpu").eps  # (256, 4, 8, 8)
    x = eps.flatten()
    n = x.numel()
    assert abs(x.mean().item()) < 4 / math.sqrt(n) and abs(x.std().item() - 1) < 4 * math.sqrt(0.5 / n)
    xs = x.double().sort().values
    ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum((ecdf - normal_cdf(xs)).abs(), (ecdf - 1 / n - normal_cdf(xs)).abs()).max().item()
    assert ks < 1.63 / math.sqrt(n)  # alpha = 0.01
    other_step = draw_noise(ObjectiveConfig(), 0, 1, 0, 256, 0, 1, (4, 8, 8), "cpu").eps
    other_seed = draw_noise(ObjectiveConfig(), 1, 0, 0, 256, 0, 1, (4, 8, 8), "cpu").eps
    flat = eps.flatten(1)  # (256, 256)
    pairs = {"element": (flat[:, :-1], flat[:, 1:]), "position": (flat[:-1], flat[1:]),
             "step": (eps, other_step), "seed": (eps, other_seed)}
    for what, (u, v) in pairs.items():
        corr = torch.corrcoef(torch.stack([u.flatten(), v.flatten()]))[0, 1].item()
        assert abs(corr) < 4 / math.sqrt(u.numel()), (what, corr)


def test_scalar_draws_are_uniform():
    """The per-sample counters (time, indicator, partner key) are uniform 32-bit words, uncorrelated."""
    bits = random_bits(sample_keys(9, 3, torch.arange(50_000)), torch.arange(EPS_FIRST_COUNTER)).double()
    u = bits / 2**32  # (N, 3)
    assert (u.mean(0) - 0.5).abs().max() < 4 * math.sqrt(1 / 12 / u.shape[0])
    assert (torch.corrcoef(u.t()) - torch.eye(3, dtype=torch.float64)).abs().max() < 4 / math.sqrt(u.shape[0])


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0])])
def test_flow_loss_weight(weight):
    v, z0, z1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    base = ((v - (z1 - (1 - 1e-5) * z0)) ** 2).flatten(1).mean(1)
    got = reference.flow_matching_loss(v, z0, z1, 1e-5, weight)
    assert torch.allclose(got, base * (1 if weight is None else weight))


# ----------------------------------------------------------------------------- on a GPU (a later session)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_noise_on_cuda_is_the_noise_on_cpu():
    """Integer hashing gives the same bits on both devices; t and eps agree to float rounding."""
    cfg = ObjectiveConfig(uncond_prob=0.3)
    cpu, cuda = (draw_noise(cfg, 11, 3, 64, 16, 1, 4, (4, 8, 8), d) for d in ("cpu", "cuda"))
    assert torch.equal(cpu.indicator, cuda.indicator.cpu()) and torch.equal(cpu.swap.index, cuda.swap.index.cpu())
    assert torch.allclose(cpu.t, cuda.t.cpu(), atol=1e-6) and torch.allclose(cpu.eps, cuda.eps.cpu(), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_micro_step_does_not_sync_the_host():
    """Pinned batch copies, draw_noise, the objective's forward and backward, fused AdamW and the
    EMA's foreach lerp run with torch.cuda.set_sync_debug_mode("error"): any host sync raises.
    (DeepSpeed's per-optimizer-step non-finite check is the one left: README, Host work per step.)"""
    from trainer.config import ModelConfig
    from trainer.engine import EMA
    from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
    from trainer.models.crossflow.layers import TORCH_OPS
    from trainer.objectives import crossflow_losses
    torch.manual_seed(0)
    model = CrossFlow(resolve_args(ModelConfig(preset="tiny"), (3, 16, 16), text_dim=24, max_tokens=6)).cuda()
    ema, opt = EMA(model, 0.999), torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    cfg = ObjectiveConfig(uncond_prob=0.5)
    batch = {"z1": torch.randn(8, 3, 16, 16).pin_memory(), "emb": torch.randn(8, 6, 24).pin_memory(),
             "mask": torch.ones(8, 6, dtype=torch.bool).pin_memory()}
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2):
            z1, emb, mask = (batch[k].to("cuda", non_blocking=True) for k in ("z1", "emb", "mask"))
            noise = draw_noise(cfg, 0, step, 0, 8, 0, 1, (3, 16, 16), "cuda")
            crossflow_losses(model, z1, emb, mask, cfg, TORCH_OPS, noise).total.backward()
            opt.step()
            opt.zero_grad()
            ema.update(model)
    finally:
        torch.cuda.set_sync_debug_mode("default")
