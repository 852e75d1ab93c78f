"""Model families own their wiring: the engine wraps the blocks each family names with activation
checkpointing and torch.compile (CrossFlow and the cross-attention baseline train either way, through
the real engine), and the learned text down-projection before the Text VE / cross-attention."""
from __future__ import annotations

import dataclasses
import re

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


# model_args as checkpoints written before the shared trunk stored them (json key order of that time)
OLD_CROSSFLOW_ARGS = {"latent_shape": [3, 16, 16], "text_dim": 24, "max_tokens": 6, "hidden_size": 64, "depth": 1,
                      "head_dim": 64, "patch_size": 4, "mlp_ratio": 4.0, "pos_embed": "learned", "text_ve_width": 64,
                      "text_ve_depth": 1, "text_ve_reduced_width": 32, "text_ve_dropout": 0.0,
                      "image_encoder_width": 8, "init_temperature": 0.07, "text_proj_dim": 0, "family": "crossflow"}
OLD_BASELINE_ARGS = {"latent_shape": [3, 16, 16], "text_dim": 24, "max_tokens": 6, "hidden_size": 64, "depth": 1,
                     "head_dim": 64, "patch_size": 4, "mlp_ratio": 4.0, "pos_embed": "learned", "text_proj_dim": 16,
                     "family": "cross_attention_fm"}
# the state-dict names those checkpoints hold for the flow networks (CrossFlow's under ``flow.``)
PATCH_AND_TIME = ["patch_embed.weight", "patch_embed.bias", "t_embedder.mlp.0.weight", "t_embedder.mlp.0.bias",
                  "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias"]
ATTN = ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"]
CROSS = ["cross_norm.weight", "cross_norm.bias", "cross_attn.q.weight", "cross_attn.q.bias", "cross_attn.kv.weight",
         "cross_attn.kv.bias", "cross_attn.proj.weight", "cross_attn.proj.bias"]
MLP_ADALN = ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias", "adaLN_modulation.1.weight",
             "adaLN_modulation.1.bias"]
FINAL = ["final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias", "final_layer.linear.weight",
         "final_layer.linear.bias"]
OLD_FLOW_NAMES = ["pos_embed", "indicator", *PATCH_AND_TIME, *(f"blocks.0.{n}" for n in ATTN + MLP_ADALN), *FINAL]
OLD_BASELINE_NAMES = ["pos_embed", "null_text", *PATCH_AND_TIME, "text_proj.mlp.0.weight", "text_proj.mlp.0.bias",
                      "text_proj.mlp.2.weight", "text_proj.mlp.2.bias", "text_norm.weight", "text_norm.bias",
                      *(f"blocks.0.{n}" for n in ATTN + CROSS + MLP_ADALN), *FINAL]


def test_both_families_share_one_trunk_and_old_checkpoints_keep_their_names():
    """One DiT trunk (patchify, position and time embeddings, blocks, final layer, init) and one
    argument resolution serve both families; args dicts and state-dict names written before the
    trunk existed still build and load, in the order their parameters were created."""
    from trainer.models.crossflow.trunk import DiTTrunk, TrunkArgs
    cf, base = model_from_args(OLD_CROSSFLOW_ARGS), model_from_args(OLD_BASELINE_ARGS)
    assert isinstance(cf.flow, DiTTrunk) and isinstance(base, DiTTrunk)
    assert [n for n in cf.state_dict() if n.startswith("flow.")] == [f"flow.{n}" for n in OLD_FLOW_NAMES]
    assert list(base.state_dict()) == OLD_BASELINE_NAMES
    for model, old in ((cf, OLD_CROSSFLOW_ARGS), (base, OLD_BASELINE_ARGS)):
        stored = dataclasses.asdict(model.args)
        added = {"prediction": "velocity",  # model.prediction's default, both families
                 **({"text_ve": "variational", "contrastive": "image_text",  # the ablations' and the task's defaults
                     "source": "text_ve", "target": "image", "source_shape": (), "caption_vocab": 0,
                     "caption_tokens": 0} if model is cf else {})}
        assert {**stored, "latent_shape": list(stored["latent_shape"])} == {**old, **added}  # the same fields and values
        model_from_args(old).load_state_dict(model.state_dict())  # strict: every name matches
    config = ModelConfig(preset="tiny", hidden_size=64, depth=1)
    sizes = [dataclasses.asdict(resolve_model_args(dataclasses.replace(config, family=f), (3, 16, 16), 24, 6))
             for f in ("crossflow", "cross_attention_fm")]
    shared = [f.name for f in dataclasses.fields(TrunkArgs) if f.name != "family"]
    assert [sizes[0][k] for k in shared] == [sizes[1][k] for k in shared]


def test_config_accepts_exactly_the_registered_families():
    """model.family's check in the config (which imports no model code) names the registry's families."""
    from trainer.config import ConfigError
    from trainer.models.families import FAMILIES
    for name in FAMILIES:
        ModelConfig(family=name).validate()
    with pytest.raises(ConfigError, match=re.escape(str(list(FAMILIES)))):
        ModelConfig(family="unregistered").validate()
