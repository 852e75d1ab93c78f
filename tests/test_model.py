import pytest
import torch

from trainer.config import ModelConfig, ObjectiveConfig
from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
from tests.support.training_noise import training_noise
from trainer.models.crossflow.layers import TORCH_OPS
from trainer.objectives import crossflow_losses


def tiny_model(**kw):
    cfg = ModelConfig(preset="tiny", **kw)
    return CrossFlow(resolve_args(cfg, (3, 16, 16), text_dim=24, max_tokens=6))


def test_shapes_and_separate_methods():
    torch.manual_seed(0)
    m = tiny_model()
    emb, mask = torch.randn(2, 6, 24), torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6]).bool()
    z0, mu, logvar = m.encode_text(emb, mask)
    assert z0.shape == mu.shape == logvar.shape == (2, 3, 16, 16)
    v = m.velocity(z0, torch.rand(2), torch.tensor([1, 0]))
    assert v.shape == (2, 3, 16, 16)
    emb, scale = m.embed_image(z0)
    assert emb.shape == (2, 3 * 16 * 16) and scale.shape == (1,)


def test_zero_init_gives_zero_velocity():
    m = tiny_model()
    v = m.velocity(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 0]))
    assert torch.count_nonzero(v) == 0


def test_z0_is_reparameterized():
    torch.manual_seed(0)
    m = tiny_model()
    emb, mask = torch.randn(3, 6, 24), torch.ones(3, 6, dtype=torch.bool)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    z0, mu, logvar = m.encode_text(emb, mask, generator=g1)
    eps = torch.randn(mu.shape, generator=g2)
    assert torch.allclose(z0, mu + torch.exp(0.5 * logvar) * eps, atol=1e-6)
    assert torch.equal(m.encode_text(emb, mask, use_mean=True)[0], mu)


def test_padding_tokens_do_not_matter():
    torch.manual_seed(0)
    m = tiny_model().eval()
    emb, mask = torch.randn(1, 6, 24), torch.tensor([[1, 1, 1, 1, 0, 0]]).bool()
    mu1, _ = m.text_ve(emb, mask)
    emb2 = emb.clone()
    emb2[:, 4:] = torch.randn(1, 2, 24) * 10
    mu2, _ = m.text_ve(emb2, mask)
    assert torch.allclose(mu1, mu2, atol=1e-5)


def test_indicator_changes_velocity_after_training_signal():
    torch.manual_seed(0)
    m = tiny_model()
    for name, p in m.flow.named_parameters():  # leave the adaLN-Zero init: blocks become non-identity
        if "adaLN_modulation" in name or "final_layer" in name:
            torch.nn.init.normal_(p, std=0.02)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    v_c = m.velocity(x, t, torch.tensor([1, 1]))
    v_u = m.velocity(x, t, torch.tensor([0, 0]))
    assert not torch.allclose(v_c, v_u)


@pytest.mark.parametrize("pos_embed", ["sincos", "learned"])
def test_gradient_reaches_every_parameter(pos_embed):
    """After a few steps (the adaLN-Zero init blocks gradients to most weights at step 0)."""
    torch.manual_seed(0)
    m = tiny_model(pos_embed=pos_embed)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    cfg = ObjectiveConfig(uncond_prob=0.5)
    emb, mask = torch.randn(8, 6, 24), torch.ones(8, 6, dtype=torch.bool)
    z1 = torch.randn(8, 3, 16, 16)
    for step in range(3):
        opt.zero_grad()
        crossflow_losses(m, z1, emb, mask, cfg, TORCH_OPS, training_noise(cfg, z1, step)).total.backward()
        opt.step()
    opt.zero_grad()
    crossflow_losses(m, z1, emb, mask, cfg, TORCH_OPS, training_noise(cfg, z1, 3)).total.backward()
    missing = [n for n, p in m.named_parameters()
               if p.requires_grad and (p.grad is None or torch.count_nonzero(p.grad) == 0)]
    assert not missing, f"no gradient reaches: {missing}"


def test_encoder_gets_flow_matching_gradient():
    """The VE trains jointly through z0, not only through KL and the contrastive loss."""
    torch.manual_seed(0)
    m = tiny_model()
    for p in m.flow.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    cfg = ObjectiveConfig(kl_weight=0.0, contrastive_weight=0.0)
    z1 = torch.randn(4, 3, 16, 16)
    crossflow_losses(m, z1, torch.randn(4, 6, 24), torch.ones(4, 6, dtype=torch.bool), cfg, TORCH_OPS,
                     training_noise(cfg, z1)).total.backward()
    assert m.text_ve.head.weight.grad.abs().sum() > 0


def _perturbed(m):
    for name, p in m.named_parameters():  # leave the adaLN-Zero init, so the network's output is not 0
        if "adaLN_modulation" in name or "final_layer" in name:
            torch.nn.init.normal_(p, std=0.05)
    return m


def test_x1_prediction_is_the_end_point_as_a_velocity():
    """model.prediction=x1: the same network (same weights) read as the end point x1_hat, turned into
    (x1_hat - x_t) / (1 - t) with 1 - t clamped at 0.05; one Euler step over the remaining time lands
    on x1_hat itself."""
    torch.manual_seed(0)
    v_model = _perturbed(tiny_model())
    x_model = tiny_model(prediction="x1")
    x_model.load_state_dict(v_model.state_dict())
    x_t, t, ind = torch.randn(3, 3, 16, 16), torch.tensor([0.0, 0.5, 0.99]), torch.tensor([1, 1, 0])
    out = v_model.velocity(x_t, t, ind)  # the raw network output
    remaining = torch.tensor([1.0, 0.5, 0.05]).view(3, 1, 1, 1)
    assert torch.allclose(x_model.velocity(x_t, t, ind), (out - x_t) / remaining, atol=1e-5)
    assert torch.allclose(x_t[:2] + remaining[:2] * x_model.velocity(x_t, t, ind)[:2], out[:2], atol=1e-5)


def test_x1_prediction_in_the_baseline():
    from trainer.models.families import model_from_args, resolve_model_args
    cfg = ModelConfig(family="cross_attention_fm", preset="tiny", prediction="x1")
    torch.manual_seed(0)
    x = model_from_args(resolve_model_args(cfg, (3, 16, 16), text_dim=24, max_tokens=6))
    emb, mask = torch.randn(2, 6, 24), torch.ones(2, 6, dtype=torch.bool)
    x_t, t = torch.randn(2, 3, 16, 16), torch.tensor([0.25, 0.75])
    v = x.velocity(x_t, t, torch.tensor([1, 1]), x.text_condition(emb, mask))
    # zero-initialized final layer: x1_hat = 0, so v = -x_t / (1 - t)
    assert torch.allclose(v, -x_t / (1 - t).view(2, 1, 1, 1), atol=1e-6)


def test_prediction_is_validated():
    from trainer.config import ConfigError
    with pytest.raises(ConfigError, match="model.prediction"):
        ModelConfig(prediction="eps").validate()
