"""crossflow plan: formulas, the CLI (table and JSON), train's start-up memory check, and every
shipped config: its model builds on the meta device through the training entry point with the
parameter count its name promises, and it plans (the 0.95B 256 px recipe fits 8 GPUs of 80 GB)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHAPES_TINY, tiny_overrides
from cluster.cli import main
from trainer.config import ConfigError, load_config
from trainer.models.families import BlockStack
from trainer.plan import (Hardware, activation_bytes_per_sample, build_meta_model, check_memory_at_start,
                          comm_bytes_per_step, make_plan, state_bytes)

REPO = Path(__file__).resolve().parents[1]
PAPER = sorted((REPO / "configs" / "paper").glob("*.yaml"))
TASK_CONFIGS = sorted((REPO / "configs" / "tasks").glob("*.yaml"))
SHIPPED = [REPO / "configs" / "demo.yaml", Path(SHAPES_TINY), *PAPER, *TASK_CONFIGS]


def test_state_bytes_follow_the_zero_stage():
    P, N = 1_000_000_000, 8
    s1, s2, s3 = (state_bytes(P, N, z, 2, offload=False, ema=True) for z in (1, 2, 3))
    assert s1["weights"] == s2["weights"] == 2 * P and s3["weights"] == 2 * P / N
    assert s1["optimizer"] == s2["optimizer"] == s3["optimizer"] == 12 * P / N
    assert s1["gradients"] == 2 * P + 4 * P / N  # full bf16 grads + the fp32 partition
    assert s2["gradients"] == 2 * 5e8 + 4 * P / N  # DeepSpeed's reduce bucket + the fp32 partition
    assert s1["ema"] == 4 * P and s3["ema"] == 4 * P / N
    off = state_bytes(P, N, 2, 2, offload=True, ema=False)
    assert off["optimizer"] == off["ema"] == 0 and off["host"] == 16 * P / N


def test_comm_volumes_of_ring_collectives():
    P = 10**9
    assert comm_bytes_per_step(P, 1, 2, 2, 4) == 0
    one = 7 / 8 * P * 2
    assert comm_bytes_per_step(P, 8, 1, 2, 4) == pytest.approx(2 * one)  # reduce-scatter + all-gather
    assert comm_bytes_per_step(P, 8, 2, 2, 4) == pytest.approx(5 * one)  # a reduce-scatter per micro-batch
    assert comm_bytes_per_step(P, 8, 3, 2, 4) == pytest.approx(12 * one)  # 2 all-gathers + 1 RS per micro-batch


def test_activation_checkpointing_keeps_block_inputs_only():
    flow = BlockStack("flow", depth=20, tokens=257, width=1024, heads=16, mlp_ratio=4.0)
    full, ac = (activation_bytes_per_sample([flow], 2, c) for c in (False, True))
    assert full == 2 * (20 * 257 * 1024 * 21 + 6 * 257 * 1024)
    assert ac == 2 * (20 * 257 * 1024 + 257 * 1024 * 21 + 6 * 257 * 1024)
    cross = BlockStack("flow", depth=20, tokens=257, width=1024, heads=16, mlp_ratio=4.0, cross_tokens=77)
    assert activation_bytes_per_sample([cross], 2, False) > full


def test_plan_cli_table_and_json(capsys):
    config = str(REPO / "configs" / "paper" / "crossflow_0.95B_256px_clip.yaml")
    args = ["plan", "--config", config, "--micro-batch", "8", "cluster.num_workers=1", "train.zero_stage=2"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "flow transformer" in table and "ZeRO-2" in table and "micro-batch 8" in table and "GiB" in table
    assert main([*args[:5], "--json", "--gpu-memory-gb", "40", *args[5:], "train.activation_checkpointing=false"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["micro_batch"] == 8 and plan["world_size"] == 1 and plan["activation_checkpointing"] is False
    assert plan["comm_gb_per_step"] == 0 and plan["hardware"]["gpu_memory_gb"] == 40
    rows = plan["memory_gib"]
    assert plan["allocated_gib"] == pytest.approx(rows["weights"] + rows["gradients"] + rows["optimizer"]
                                                  + rows["ema"] + max(rows["activations"], rows["step_temporaries"]))


def test_train_refuses_a_gpu_run_that_cannot_fit(tmp_path, capsys):
    over = tiny_overrides(tmp_path / "run", **{"cluster.gpus_per_worker": 1, "train.gpu_memory_gb": 0.01})
    assert main(["train", "--config", SHAPES_TINY, *over]) == 2  # refused before Ray or any worker starts
    err = capsys.readouterr().err
    assert "more than the 0.0 GiB of GPU memory" in err and "train.memory_check=false" in err
    cfg = load_config(None, over)
    with pytest.raises(ConfigError, match="weights .* activations"):
        check_memory_at_start(cfg, 2)
    check_memory_at_start(load_config(None, [*over, "train.memory_check=false"]), 2)  # overridden: no error
    check_memory_at_start(load_config(None, tiny_overrides(tmp_path / "cpu")), 2)
    assert "CPU run: not checked" in capsys.readouterr().err


def _expected_flow_params(name: str) -> tuple[float, float]:
    """(low, high) of the flow network's parameters a shipped config's name promises."""
    if name.startswith("crossflow_0.95B"):
        return 0.95e9 * 0.97, 0.95e9 * 1.03
    if name.startswith("crossflow_70M") or name == "super_resolution_64to256_vae":
        return 70e6 * 0.97, 70e6 * 1.03
    if name == "baseline_0.95B_256px_t5":  # cross-attention k/v read the 1024-d projected T5 tokens, not 768
        return 1.04e9, 1.13e9
    if name.startswith("baseline_0.95B"):  # the paper's 1.04B counterpart
        return 1.04e9, 1.10e9
    if name.startswith("baseline_70M"):  # same width and depth plus cross-attention
        return 70e6, 100e6
    return 0, float("inf")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_config_builds_on_meta_and_plans(path):
    cfg = load_config(path)
    model = build_meta_model(cfg)
    assert next(model.parameters()).device.type == "meta"
    low, high = _expected_flow_params(path.stem)
    assert low <= model.flow_params() <= high, f"{path.stem}: {model.flow_params() / 1e6:.1f}M"
    plan = make_plan(cfg, Hardware(gpu_memory_gb=80))
    assert plan.total_gib > 0 and plan.flops_per_sample > 0
    if path.parent.name == "paper":
        assert plan.fits and plan.best_micro_batch >= plan.micro_batch, path.stem
        assert plan.micro_batch * plan.world_size * cfg.train.grad_accum == cfg.train.global_batch_size


@pytest.mark.parametrize("task", [{"task.source": "image_ve", "task.target": "caption"},
                                  {"task.source": "image_ve", "task.target": "depth"}], ids=["caption", "depth"])
def test_plan_builds_the_tasks_model(tmp_path, task):
    """The plan's model is the one training builds for the task (same parameters), and its state
    memory follows from that count (ZeRO-2, fp32, 2 workers: a 4P/N fp32 gradient partition + the
    reduce bucket)."""
    from data_pipeline.features import load_text_encoder
    from trainer.loop import build_model
    from trainer.model_input import declared_model_input
    from trainer.plan import GIB, REDUCE_BUCKET_ELEMENTS
    from trainer.tasks import with_flow_shape
    cfg = load_config(None, tiny_overrides(tmp_path, **task, **{"train.zero_stage": 2, "cluster.num_workers": 2}))
    plan = make_plan(cfg, Hardware(gpu_memory_gb=80))
    mi = with_flow_shape(cfg, declared_model_input(cfg))
    vocab = load_text_encoder(cfg.data.text_encoder).vocab_size if task["task.target"] == "caption" else 0
    model = build_model(cfg, mi.latent_shape, mi.text_dim, "cpu", vocab)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.trainable_params == P and plan.task == mi.task and plan.latent_shape == tuple(mi.latent_shape)
    assert ("caption decoder" in plan.params) == (task["task.target"] == "caption") and "Text VE" not in plan.params
    assert plan.memory_gib["weights"] == pytest.approx(4 * P / GIB)
    assert plan.memory_gib["gradients"] == pytest.approx((4 * P / 2 + 4 * REDUCE_BUCKET_ELEMENTS) / GIB)
    assert plan.memory_gib["optimizer"] == pytest.approx(12 * P / 2 / GIB)
    assert any("reduce bucket" in n for n in plan.notes)


def test_paper_recipe_values_and_its_plan_on_8_gpus():
    cfg = load_config(REPO / "configs" / "paper" / "crossflow_0.95B_256px_clip.yaml")
    o, t, d, ob = cfg.optim, cfg.train, cfg.data, cfg.objective
    assert (o.betas, o.weight_decay, o.lr, o.warmup_steps, o.schedule) == ([0.9, 0.9], 0.03, 1e-4, 5000, "constant")
    assert (t.global_batch_size, t.ema_decay, t.precision, t.activation_checkpointing) == (1024, 0.9999, "bf16", True)
    assert (ob.time_sampler, ob.kl_weight) == ("logit_normal", 1e-4) and ob.contrastive_weight > 0
    assert (d.source, d.space, d.text_dim, d.max_tokens) == ("mds", "latent", 768, 77) and d.path.startswith("s3://")
    assert cfg.cluster.storage_path.startswith("s3://") and cfg.cluster.gpus_per_worker == 1
    assert cfg.cluster.num_workers == 64  # configs/cluster/gpu_8x8.yaml
    on8 = make_plan(load_config(REPO / "configs" / "paper" / "crossflow_0.95B_256px_clip.yaml",
                                ["cluster.num_workers=8", "train.grad_accum=1"]), Hardware(gpu_memory_gb=80))
    assert on8.fits and (on8.best_micro_batch, on8.best_grad_accum) == (128, 1), (on8.best_micro_batch, on8.total_gib)
    assert on8.total_gib < 80

    t5 = load_config(REPO / "configs" / "paper" / "crossflow_0.95B_256px_t5.yaml")
    assert (t5.data.text_dim, t5.model.text_proj_dim) == (4096, 1024)
    hi = load_config(REPO / "configs" / "paper" / "crossflow_0.95B_512px_clip.yaml")
    assert hi.data.resolution == 512 and "crossflow_0.95B_256px_clip" in hi.train.init_from
    assert build_meta_model(hi).args.latent_shape == (4, 64, 64)
    shipped = make_plan(cfg)  # 64 GPUs x micro-batch 16, no accumulation
    assert (shipped.world_size, shipped.micro_batch, shipped.grad_accum, shipped.fits) == (64, 16, 1, True)
