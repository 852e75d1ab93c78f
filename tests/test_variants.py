"""The paper's ablations as config fields (issue 16): a deterministic Text VE, z0's alignment term
(image_text, text_text, reconstruction) and two-stage training, through the real objective and, for
the stages, the real DeepSpeed engine in one process."""
from __future__ import annotations

import pytest
import torch

from tests.support.training_noise import training_noise
from trainer.config import ConfigError, ModelConfig, ObjectiveConfig
from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
from trainer.models.crossflow.layers import TORCH_OPS
from trainer.models.crossflow.text_heads import pooled_text_features
from trainer.models.families import family_of, model_from_args
from trainer.objectives import FLOW_ONLY, JOINT, VE_PRETRAIN, crossflow_losses, training_stage
from trainer.sampling import encode_prompts, interpolate_z0, solve, z0_arithmetic

LATENT, TEXT_DIM, TOKENS = (3, 16, 16), 24, 6


def tiny_model(contrastive: str = "image_text", **kw) -> CrossFlow:
    return CrossFlow(resolve_args(ModelConfig(preset="tiny", **kw), LATENT, TEXT_DIM, TOKENS, 0.07, contrastive))


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, TOKENS, dtype=torch.bool)
    mask[::2, 4:] = False  # padded captions
    return torch.randn(n, *LATENT, generator=g), torch.randn(n, TOKENS, TEXT_DIM, generator=g), mask


def test_deterministic_text_ve_has_no_logvar_and_no_kl():
    torch.manual_seed(0)
    m = tiny_model(text_ve="deterministic")
    assert m.text_ve.head.out_features == 3 * 16 * 16  # no logvar half
    z1, emb, mask = batch(4)
    z0, mu, logvar = m.encode_text(emb, mask, eps=torch.randn(4, *LATENT))
    assert logvar is None and z0 is mu and z0.shape == (4, *LATENT)
    # the sampling noise is a documented no-op: every seed, eps or use_mean gives the same z0
    assert torch.equal(encode_prompts(m, emb, mask, seed=1), encode_prompts(m, emb, mask, seed=2))
    assert torch.equal(encode_prompts(m, emb, mask, use_mean=True), z0)
    assert solve(m, z0, steps=2, cfg_scale=3.0).shape == z0.shape
    assert interpolate_z0(z0[0], z0[1], 3).shape == (3, *LATENT)
    assert z0_arithmetic([(1.0, z0[0]), (-1.0, z0[1]), (1.0, z0[2])]).shape == LATENT
    cfg = ObjectiveConfig(uncond_prob=0.25, kl_weight=1.0)  # a KL weight is allowed: unused
    losses = crossflow_losses(m, z1, emb, mask, cfg, TORCH_OPS, training_noise(cfg, z1))
    assert losses.kl.item() == 0.0
    losses.total.backward()
    assert m.text_ve.head.weight.grad.abs().sum() > 0
    assert model_from_args(m.args).text_ve.head.out_features == 3 * 16 * 16  # checkpoints' args rebuild it


@pytest.mark.parametrize("variant,head", [("image_text", "image_encoder"), ("text_text", "text_feature_embedder"),
                                          ("reconstruction", "text_feature_decoder")])
def test_each_alignment_variant_builds_only_its_head_and_its_loss_falls(variant, head):
    """Forward and backward of the variant's term, gradients into its head and the Text VE, and a
    few AdamW steps on one fixed batch lower it (the flow's own term held out: weight on the term)."""
    torch.manual_seed(0)
    m = tiny_model(variant, text_ve_depth=1)
    built = {h for h in ("image_encoder", "text_feature_embedder", "text_feature_decoder") if getattr(m, h) is not None}
    assert built == {head}
    counts = family_of(m).param_counts(m)
    assert sum(counts.values()) == sum(p.numel() for p in m.parameters())
    assert model_from_args(m.args).args.contrastive == variant
    cfg = ObjectiveConfig(uncond_prob=0.25, contrastive=variant, kl_weight=0.0)
    z1, emb, mask = batch()
    opt = torch.optim.AdamW([p for n, p in m.named_parameters() if not n.startswith("flow.")], lr=3e-3)
    values = []
    for step in range(6):
        opt.zero_grad()
        losses = crossflow_losses(m, z1, emb, mask, cfg, TORCH_OPS, training_noise(cfg, z1), VE_PRETRAIN)
        losses.contrastive.backward()
        if step == 0:
            assert all(p.grad is not None for p in getattr(m, head).parameters()), variant
            assert m.text_ve.head.weight.grad.abs().sum() > 0
        opt.step()
        values.append(losses.contrastive.item())
    assert values[-1] < 0.8 * values[0], (variant, values)


def test_reconstruction_target_is_the_pooled_language_model_features():
    emb = torch.arange(12.0).view(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(pooled_text_features(emb, mask), emb[0, :2].mean(0, keepdim=True))


def test_a_model_without_the_variants_head_says_so():
    m = tiny_model("text_text")
    with pytest.raises(ValueError, match="objective.contrastive='text_text'.*no image_encoder"):
        m.embed_image(torch.randn(1, *LATENT))


def test_stages_follow_the_step():
    two = ObjectiveConfig(ve_pretrain_steps=3)
    assert [training_stage(two, s) for s in range(5)] == [VE_PRETRAIN] * 3 + [FLOW_ONLY] * 2
    fine = ObjectiveConfig(ve_pretrain_steps=3, ve_finetune=True)
    assert [training_stage(fine, s) for s in (2, 3)] == [VE_PRETRAIN, JOINT]
    assert training_stage(ObjectiveConfig(), 0) == JOINT


@pytest.mark.parametrize("overrides,match", [
    ({"objective.ve_pretrain_steps": 4}, "ve_pretrain_steps=4 must be less than train.steps=4"),
    ({"objective.ve_finetune": True}, "ve_finetune=true needs objective.ve_pretrain_steps"),
    ({"objective.ve_pretrain_steps": 2, "objective.contrastive_weight": 0}, "contrastive_weight=0"),
    ({"objective.contrastive": "text_image"}, "objective.contrastive must be one of"),
    ({"model.text_ve": "plain"}, "model.text_ve must be one of"),
    ({"model.family": "cross_attention_fm", "objective.contrastive": "text_text"}, "need model.family=crossflow"),
    ({"model.family": "cross_attention_fm", "model.text_ve": "deterministic"}, "need model.family=crossflow"),
    ({"model.family": "cross_attention_fm", "objective.ve_pretrain_steps": 2}, "need model.family=crossflow"),
])
def test_nonsense_variants_fail_at_start_naming_the_keys(tiny_config, overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**overrides)


def _local(p: torch.Tensor) -> torch.Tensor:
    """A parameter's values on this rank: its ZeRO-3 partition (the whole of it in one process)."""
    return (p.ds_tensor if hasattr(p, "ds_tensor") else p).detach()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _local(p).clone() for n, p in module.named_parameters()}


def _moved(before: dict, module: torch.nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if not torch.equal(before[n], _local(p))]


@pytest.mark.parametrize("finetune,zero_stage", [(False, 1), (False, 2), (False, 3), (True, 2)])
def test_two_stage_training_freezes_exactly_through_the_engine_and_resumes(tiny_config, tmp_path, finetune,
                                                                           zero_stage):
    """Through the real DeepSpeed engine (ZeRO 1, 2, 3; one process), weight decay on: steps 0-1 train the
    text side only (the flow stays bit-identical), steps 2-3 the flow (the Text VE stays bit-identical
    unless ve_finetune); a checkpoint saved at the boundary resumes into the flow stage with the LRs
    of the uninterrupted run."""
    from trainer.engine import Engine, init_distributed
    cfg = tiny_config(**{"objective.ve_pretrain_steps": 2, "objective.ve_finetune": finetune, "model.depth": 1,
                         "train.zero_stage": zero_stage,
                         "optim.weight_decay": 0.1, "optim.warmup_steps": 1, "objective.uncond_prob": 0.25})

    def build():
        torch.manual_seed(0)
        model = model_from_args(resolve_args(cfg.model, LATENT, TEXT_DIM, TOKENS))
        for p in model.flow.final_layer.parameters():  # past the adaLN-Zero init: gradients reach the VE
            torch.nn.init.normal_(p, std=0.02)
        return Engine(model, cfg.train, cfg.optim, 8, init_distributed("cpu"), cfg.objective)

    def train_step(engine, step):
        z1, emb, mask = batch(8, seed=step)
        noise = training_noise(cfg.objective, z1, step)
        losses = crossflow_losses(engine.module, z1, emb, mask, cfg.objective, TORCH_OPS, noise,
                                  training_stage(cfg.objective, step))
        engine.backward(losses.total)
        assert engine.step()
        return losses

    engine = build()
    m = engine.module
    flow, text, head = _snapshot(m.flow), _snapshot(m.text_ve), _snapshot(m.image_encoder)
    for step in (0, 1):
        losses = train_step(engine, step)
        assert losses.flow_matching.item() == 0.0 and losses.total.item() > 0
    assert not _moved(flow, m.flow), "stage 1 moved the flow"
    assert _moved(text, m.text_ve) and _moved(head, m.image_encoder), "stage 1 did not train the text side"
    engine.save(str(tmp_path / "ckpt"), "boundary")
    text = _snapshot(m.text_ve)
    lrs = []
    for step in (2, 3):
        train_step(engine, step)
        lrs.append([g["lr"] for g in engine.optimizer.param_groups])
    assert _moved(flow, m.flow), "stage 2 did not train the flow"
    assert bool(_moved(text, m.text_ve)) == finetune
    after = _snapshot(m)

    resumed = build()  # a fresh run loaded from the boundary continues in stage 2, identically
    resumed.load(str(tmp_path / "ckpt"), "boundary")
    assert resumed.ds.global_steps == 2
    for step in (2, 3):
        train_step(resumed, step)
        assert [g["lr"] for g in resumed.optimizer.param_groups] == lrs[step - 2]
    assert not _moved(after, resumed.module)
