"""The cross-attention flow-matching baseline: CrossFlow's interface, noise source, CFG by null text."""
import dataclasses

import pytest
import torch

from trainer.config import ModelConfig, ObjectiveConfig
from trainer.models.crossflow.baselines import CrossAttentionFM, TextCondition, resolve_baseline_args
from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
from trainer.models.families import model_from_args, resolve_model_args
from tests.support.training_noise import training_noise
from trainer.models.crossflow.layers import TORCH_OPS
from trainer.objectives import crossflow_losses
from trainer.sampling import guided_velocity, solve


def tiny_baseline(**kw):
    return CrossAttentionFM(resolve_baseline_args(ModelConfig(preset="tiny", **kw), (3, 16, 16), 24, 6))


def text(B=2, n=6, d=24):
    mask = torch.ones(B, n, dtype=torch.bool)
    mask[0, 3:] = False  # padded caption
    return torch.randn(B, n, d), mask


def randomize_zero_init(m):
    """Leave the adaLN-Zero / zero cross-attention init so the text can reach the output."""
    for name, p in m.named_parameters():
        if "adaLN_modulation" in name or "final_layer" in name or "cross_attn.proj" in name:
            torch.nn.init.normal_(p, std=0.05)


def test_shapes_noise_source_and_zero_kl():
    torch.manual_seed(0)
    m = tiny_baseline()
    emb, mask = text()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    z0, mu, logvar = m.encode_text(emb, mask, generator=g1)
    assert z0.shape == mu.shape == logvar.shape == (2, 3, 16, 16)
    assert torch.equal(z0, torch.randn(2, 3, 16, 16, generator=g2))  # noise, independent of the text
    assert torch.count_nonzero(mu) == 0 and torch.count_nonzero(logvar) == 0
    assert torch.count_nonzero(m.encode_text(emb, mask, use_mean=True)[0]) == 0
    cond = m.text_condition(emb, mask)
    v = m.velocity(z0, torch.rand(2), torch.tensor([1, 0]), cond)
    assert v.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="needs the text"):
        m.velocity(z0, torch.rand(2), torch.tensor([1, 0]))


def test_zero_init_gives_zero_velocity():
    m = tiny_baseline()
    emb, mask = text()
    v = m.velocity(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 0]), m.text_condition(emb, mask))
    assert torch.count_nonzero(v) == 0
    for block in m.blocks:  # every block starts as the identity
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.cross_attn.proj.weight) == 0


def test_text_and_padding_reach_velocity_correctly():
    torch.manual_seed(0)
    m = tiny_baseline().eval()
    randomize_zero_init(m)
    emb, mask = text()
    x, t, ind = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 1])
    v = m.velocity(x, t, ind, TextCondition(emb, mask))
    assert not torch.allclose(v, m.velocity(x, t, ind, TextCondition(torch.randn_like(emb), mask)))
    emb2 = emb.clone()
    emb2[0, 3:] = torch.randn(3, 24) * 10  # padded tokens of caption 0 change nothing
    assert torch.allclose(v, m.velocity(x, t, ind, TextCondition(emb2, mask)), atol=1e-5)


def test_cfg_uses_learned_null_text():
    torch.manual_seed(0)
    m = tiny_baseline().eval()
    randomize_zero_init(m)
    emb, mask = text()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    uncond = torch.tensor([0, 0])
    v_u = m.velocity(x, t, uncond, TextCondition(emb, mask))
    # the unconditional branch ignores the caption entirely, and depends on the null text
    assert torch.allclose(v_u, m.velocity(x, t, uncond, TextCondition(torch.randn_like(emb), ~mask)), atol=1e-6)
    with torch.no_grad():
        m.null_text.add_(1.0)
    assert not torch.allclose(v_u, m.velocity(x, t, uncond, TextCondition(emb, mask)))
    # guided_velocity: both branches in one batched forward, combined as v_u + s (v_c - v_u)
    cond = m.text_condition(emb, mask)
    v_c = m.velocity(x, t, torch.tensor([1, 1]), cond)
    v_u = m.velocity(x, t, uncond, cond)
    assert torch.allclose(guided_velocity(m, x, t, 3.0, cond), v_u + 3.0 * (v_c - v_u), atol=1e-5)
    assert torch.allclose(guided_velocity(m, x, t, 1.0, cond), v_c)
    assert solve(m, torch.randn(2, 3, 16, 16), steps=2, solver="heun", cfg_scale=2.0, cond=cond).shape == x.shape


def test_gradient_reaches_every_parameter():
    """After a few steps (adaLN-Zero and the zero cross-attention output block most at step 0)."""
    torch.manual_seed(0)
    m = tiny_baseline(pos_embed="learned")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    cfg = ObjectiveConfig(uncond_prob=0.5)  # the null text needs unconditional rows
    emb, mask = text(8)
    z1 = torch.randn(8, 3, 16, 16)
    for step in range(3):
        opt.zero_grad()
        crossflow_losses(m, z1, emb, mask, cfg, TORCH_OPS, training_noise(cfg, z1, step)).total.backward()
        opt.step()
    opt.zero_grad()
    losses = crossflow_losses(m, z1, emb, mask, cfg, TORCH_OPS, training_noise(cfg, z1, 3))
    losses.total.backward()
    assert losses.kl.item() == 0.0 and losses.contrastive.item() == 0.0  # noise source: neither applies
    missing = [n for n, p in m.named_parameters()
               if p.requires_grad and (p.grad is None or torch.count_nonzero(p.grad) == 0)]
    assert not missing, f"no gradient reaches: {missing}"


def test_family_selects_class_and_checkpoint_args_rebuild_it():
    b = resolve_model_args(ModelConfig(preset="tiny", family="cross_attention_fm"), (3, 16, 16), 24, 6)
    c = resolve_model_args(ModelConfig(preset="tiny"), (3, 16, 16), 24, 6)
    assert isinstance(model_from_args(b), CrossAttentionFM) and isinstance(model_from_args(c), CrossFlow)
    stored = dataclasses.asdict(b)  # what weights.pt keeps
    stored["latent_shape"] = list(stored["latent_shape"])
    assert isinstance(model_from_args(stored), CrossAttentionFM)
    old = dataclasses.asdict(c)
    del old["family"]  # checkpoints written before model.family existed
    assert isinstance(model_from_args(old), CrossFlow)
    assert (b.hidden_size, b.depth, b.head_dim, b.patch_size) == (c.hidden_size, c.depth, c.head_dim, c.patch_size)


def test_param_count_at_095B_preset():
    """The paper: CrossFlow 0.95B vs the cross-attention baseline 1.04B. Same width and depth here,
    with cross-attention k/v from CLIP ViT-L/14's 768-wide tokens, on the meta device."""
    with torch.device("meta"):
        base = CrossAttentionFM(resolve_baseline_args(ModelConfig(preset="0.95B"), (4, 32, 32), 768, 77))
        cf = CrossFlow(resolve_args(ModelConfig(preset="0.95B"), (4, 32, 32), 768, 77))
    n = base.flow_params()
    assert 1.0e9 < n < 1.1e9, f"{n / 1e9:.3f}B"
    assert 1.1 < n / cf.flow_params() < 1.2
    assert base.flops_per_sample() > cf.flops_per_sample() > 0


def test_tiny_baseline_trains_through_the_loop(tiny_config):
    from trainer.loop import train
    from trainer.metrics import read_metrics
    cfg = tiny_config(**{"model.family": "cross_attention_fm", "train.steps": 30, "train.global_batch_size": 16,
                         "optim.warmup_steps": 5, "optim.lr": 2e-3, "train.log_every": 5,
                         "objective.contrastive_weight": 0.1, "eval.shapes": False, "sample.steps": 2})
    summary = train(cfg)
    curve = [r["loss"] for r in read_metrics(cfg.train.out_dir + "/metrics.jsonl") if "loss" in r]
    assert len(curve) == 6 and curve[-1] < 0.8 * curve[0], curve
    assert summary["final_loss"] == curve[-1]
    from trainer.inference import load_generator  # the checkpoint reloads as the baseline
    gen = load_generator(cfg.train.out_dir)
    assert isinstance(gen.model, CrossAttentionFM)
    assert len(gen.generate(["a red circle"], steps=2)) == 1
    with pytest.raises(ValueError, match="noise"):
        gen.interpolation("a red circle", "a blue square", 3)
