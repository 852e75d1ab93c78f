"""Model families own their wiring: the engine wraps the blocks each family names with activation
checkpointing and torch.compile (CrossFlow and the cross-attention baseline train either way, through
the real engine), and the learned text down-projection before the Text VE / cross-attention."""
from __future__ import annotations

import pytest
import torch

from trainer.config import ModelConfig
from trainer.metrics import read_metrics
from trainer.models.crossflow.baselines import CrossAttentionFM
from trainer.models.crossflow.crossflow import CrossFlow
from trainer.models.families import family_of, model_from_args, resolve_model_args, wrapped_blocks


def _losses(out_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(f"{out_dir}/metrics.jsonl") if "loss" in r}


@pytest.mark.parametrize("family", ["crossflow", "cross_attention_fm"])
def test_family_trains_with_activation_checkpointing_and_compile(tiny_config, tmp_path, family):
    from trainer.loop import train
    curves = {}
    for name, extra in {"plain": {}, "ac": {"train.activation_checkpointing": True},
                        "compile": {"train.compile": True}}.items():
        cfg = tiny_config(**{"model.family": family, "model.depth": 2, "train.steps": 3, "eval.shapes": False,
                             "sample.num_prompts": 1, "train.out_dir": str(tmp_path / name), **extra})
        summary = train(cfg)
        assert summary["steps"] == 3
        curves[name] = _losses(cfg.train.out_dir)
    for step in (1, 2, 3):
        assert curves["ac"][step] == pytest.approx(curves["plain"][step], rel=1e-5), (family, step)
        assert curves["compile"][step] == pytest.approx(curves["plain"][step], rel=1e-4), (family, step)


def _leaf_forwards_per_block(model) -> dict[int, list[int]]:
    """A counter of forward calls of the leaf modules inside each block the engine wraps; a
    recomputation (activation checkpointing's backward) calls them again."""
    counts: dict[int, list[int]] = {}
    for i, block in enumerate(wrapped_blocks(model)):
        counts[i] = [0]
        for leaf in (m for m in block.modules() if not list(m.children())):
            leaf.register_forward_hook(lambda *_, c=counts[i]: c.__setitem__(0, c[0] + 1))
    return counts


@pytest.mark.parametrize("family", ["crossflow", "cross_attention_fm"])
def test_activation_checkpointing_recomputes_every_block_in_backward(tiny_config, family):
    """Through the real engine: with train.activation_checkpointing the backward re-runs every wrapped
    block (its leaf modules are called again), without it nothing is called in backward."""
    from tests.support.training_noise import training_noise
    from trainer.engine import Engine, init_distributed
    from trainer.models.crossflow.layers import TORCH_OPS
    from trainer.objectives import crossflow_losses
    calls = {}
    for ac in (False, True):
        cfg = tiny_config(**{"model.family": family, "model.depth": 2, "train.activation_checkpointing": ac})
        torch.manual_seed(0)
        model = model_from_args(resolve_model_args(cfg.model, (3, 16, 16), 24, 6))
        counts = _leaf_forwards_per_block(model)
        engine = Engine(model, cfg.train, cfg.optim, 4, init_distributed("cpu"))
        z1, emb, mask = torch.randn(4, 3, 16, 16), torch.randn(4, 6, 24), torch.ones(4, 6, dtype=torch.bool)
        losses = crossflow_losses(engine.module, z1, emb, mask, cfg.objective, TORCH_OPS,
                                  training_noise(cfg.objective, z1))
        after_forward = {i: c[0] for i, c in counts.items()}
        engine.backward(losses.total)
        calls[ac] = {i: (after_forward[i], c[0] - after_forward[i]) for i, c in counts.items()}  # (forward, backward)
    assert len(calls[True]) >= 2  # the family's wrapped blocks (model.depth 2: at least the 2 flow blocks)
    for i, (fwd, bwd) in calls[False].items():
        assert fwd > 0 and bwd == 0, (family, i, calls[False][i])
        assert calls[True][i][0] == fwd and calls[True][i][1] > 0, (family, i, calls[True][i])  # recomputed


def test_each_family_names_its_repeated_blocks():
    cfg = ModelConfig(preset="tiny")
    cf = model_from_args(resolve_model_args(cfg, (3, 32, 32), 32, 12))
    base = model_from_args(resolve_model_args(ModelConfig(preset="tiny", family="cross_attention_fm"),
                                              (3, 32, 32), 32, 12))
    assert wrapped_blocks(cf) == [*cf.flow.blocks, *cf.text_ve.blocks]
    assert wrapped_blocks(base) == list(base.blocks)
    for model in (cf, base):  # the planner's view of the stacks matches the built blocks
        stacks = family_of(model).block_stacks(model.args)
        assert sum(s.depth for s in stacks) == len(wrapped_blocks(model))
        counts = family_of(model).param_counts(model)
        assert sum(counts.values()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["crossflow", "cross_attention_fm"])
def test_text_projection_maps_wide_features_and_learns(family):
    """T5-XXL-like 96-d tokens projected to 32 before the Text VE (or cross-attention)."""
    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", family=family, text_proj_dim=32)
    model = model_from_args(resolve_model_args(cfg, (3, 32, 32), 96, 12))
    assert model.args.text_proj_dim == 32
    assert model.text_proj.mlp[0].in_features == 96 and model.text_proj.mlp[-1].out_features == 32
    if isinstance(model, CrossFlow):
        assert model.text_ve.in_proj.in_features == 32
    else:
        assert isinstance(model, CrossAttentionFM) and model.blocks[0].cross_attn.kv.in_features == 32
    emb, mask = torch.randn(2, 12, 96), torch.ones(2, 12, dtype=torch.bool)
    z0, _, _ = model.encode_text(emb, mask)
    v = model.velocity(z0, torch.rand(2), torch.ones(2), model.text_condition(emb, mask))
    (v.square().mean() + z0.square().mean()).backward()
    assert all(p.grad is not None for p in model.text_proj.parameters())
    rebuilt = model_from_args(model.args)  # checkpoints' args rebuild the projection
    assert rebuilt.text_proj is not None
    no_proj = model_from_args(resolve_model_args(ModelConfig(preset="tiny", family=family), (3, 32, 32), 96, 12))
    assert no_proj.text_proj is None
