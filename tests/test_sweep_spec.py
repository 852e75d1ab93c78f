"""Sweep files and their points (no Ray, no training): isoFLOP budgets x sizes, steps from a FLOP
budget, workers and accumulation sized by `crossflow plan`, and the errors that name the key."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.conftest import SHAPES_TINY
from trainer.config import ConfigError, load_config
from trainer.plan import build_meta_model, format_flops, steps_for_target_flops
from trainer.sweep_spec import expand, load_sweep

BASE = SHAPES_TINY
TINY = ["model.kernels=torch", "train.global_batch_size=16", "optim.warmup_steps=5"]


def sweep_file(tmp_path, **keys) -> Path:
    values = {"name": "s", "base_config": BASE, "out_dir": str(tmp_path / "out"), "overrides": TINY, **keys}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


ISOFLOP = {"budgets": ["1e11", 3.0e11], "sizes": {"model.hidden_size": [64, 128, 192], "model.depth": [2, 3, 4]}}


def test_isoflop_points_are_budgets_x_sizes_x_grid_with_steps_from_each_budget(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, isoflop=ISOFLOP, grid={"model.family": ["crossflow", "cross_attention_fm"]}))
    points = expand(spec)
    assert len(points) == 2 * 3 * 2
    assert points[0].name == "flops-1e11_hidden_size-64_depth-2_family-crossflow"
    assert points[-1].name == "flops-3e11_hidden_size-192_depth-4_family-cross_attention_fm"
    for p in points:
        assert p.budget == p.axes["train.target_flops"] == p.cfg.train.target_flops
        per_sample = build_meta_model(p.cfg).flops_per_sample()
        assert p.steps == round(p.budget / (per_sample * 16)) == steps_for_target_flops(p.cfg)
        assert p.cfg.log.wandb_group == "s" and p.out_dir == tmp_path / "out" / p.name
    crossflow_at_1e11 = [p.steps for p in points if p.budget == 1e11 and p.cfg.model.family == "crossflow"]
    assert crossflow_at_1e11 == sorted(crossflow_at_1e11, reverse=True) and len(set(crossflow_at_1e11)) == 3
    # three times the budget, three times the steps (within rounding)
    by_name = {p.name: p.steps for p in points}
    assert abs(by_name["flops-3e11_hidden_size-64_depth-2_family-crossflow"]
               - 3 * by_name["flops-1e11_hidden_size-64_depth-2_family-crossflow"]) <= 2


def test_grid_only_sweeps_and_presets_list(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, grid={"model.hidden_size": [64, 128], "train.steps": [7]}))
    points = expand(spec)
    assert [p.name for p in points] == ["hidden_size-64_steps-7", "hidden_size-128_steps-7"]
    assert all(p.steps == 7 and p.budget == 0 for p in points)
    iso = load_sweep(sweep_file(tmp_path, isoflop={"budgets": [1e13], "sizes": ["tiny"]})).isoflop
    assert iso.sizes == {"model.preset": ["tiny"]} and iso.budgets == [1e13]


def test_variants_are_points_times_the_grid(tmp_path):
    """An ablation's points that a product cannot say: each variant once, times every grid value."""
    spec = load_sweep(sweep_file(tmp_path, variants=[{"objective.contrastive_weight": 0.1},
                                                     {"objective.contrastive_weight": 0, "model.depth": 3}],
                                 grid={"train.seed": [0, 1]}))
    points = expand(spec)
    assert [p.name for p in points] == ["contrastive_weight-0.1_seed-0", "contrastive_weight-0.1_seed-1",
                                        "contrastive_weight-0_depth-3_seed-0", "contrastive_weight-0_depth-3_seed-1"]
    assert [(p.cfg.objective.contrastive_weight, p.cfg.model.depth, p.cfg.train.seed) for p in points[1:3]] == [
        (0.1, None, 1), (0.0, 3, 0)]  # None: the preset's depth


@pytest.mark.parametrize("keys, match", [
    ({}, "give the points"),
    ({"isoflop": {"budgets": [], "sizes": ["tiny"]}}, r"isoflop.budgets must be a non-empty"),
    ({"isoflop": {"budgets": [1e12, "lots"], "sizes": ["tiny"]}}, r"isoflop.budgets\[1\] must be a positive"),
    ({"isoflop": {"budgets": [1e12], "sizes": {"model.hidden_size": []}}},
     r"sizes.model.hidden_size must be a non-empty"),
    ({"isoflop": {"budgets": [1e12], "sizes": {"model.hidden_size": [64, 128], "model.depth": [2]}}},
     r"equally long: \{'model.hidden_size': 2, 'model.depth': 1\}"),
    ({"isoflop": {"budgets": [1e12]}}, "exactly the keys budgets"),
    ({"isoflop": ISOFLOP, "grid": {"model.depth": [2]}}, r"grid or variant key\(s\) \['model.depth'\] conflict"),
    ({"variants": [{"model.depth": [2, 3]}]}, r"variants\[0\] must map config keys to single values"),
    ({"variants": [{"model.depth": 2}], "grid": {"model.depth": [3]}}, r"variants\[0\] sets grid key"),
    ({"variants": [{"model.depth": 2}, {"model.depth": 2}]}, "repeats a variant"),
    ({"grid": {"model.depth": []}}, "grid.model.depth must be a non-empty"),
    ({"grid": {"model.depth": [2]}, "resources": {"cpu": 1}}, "resources must map"),
    ({"grid": {"model.depth": [2]}, "max_workers_per_point": 0}, "max_workers_per_point must be"),
    ({"grid": {"model.depth": [2]}, "min_workers_per_point": 16},
     "min_workers_per_point=16 exceeds max_workers_per_point=8"),
])
def test_bad_sweep_files_name_the_key(tmp_path, keys, match):
    with pytest.raises(ConfigError, match=match):
        load_sweep(sweep_file(tmp_path, **keys))


def test_a_budget_under_the_warmup_names_the_point_budget_flops_and_batch(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, isoflop={"budgets": [1e11, 3e10],
                                                    "sizes": {"model.hidden_size": [64, 192]}}))
    per_sample = build_meta_model(load_config(BASE, [*TINY, "model.hidden_size=192"])).flops_per_sample()
    with pytest.raises(ConfigError) as e:
        expand(spec)
    message = str(e.value)
    assert "point flops-3e10_hidden_size-192" in message and "train.target_flops=3e10" in message
    assert f"{per_sample:.4g} FLOPs per sample" in message and "train.global_batch_size=16" in message
    assert "optim.warmup_steps=5" in message


def test_a_size_the_model_cannot_take_names_the_point(tmp_path):
    spec = load_sweep(sweep_file(tmp_path, isoflop={"budgets": [1e12], "sizes": {"model.hidden_size": [64, 96]}}))
    with pytest.raises(ConfigError, match="point flops-1e12_hidden_size-96: cannot build its model: width 96"):
        expand(spec)


def test_format_flops():
    assert [format_flops(v) for v in (2e12, 6.5e12, 1.2e20, 300.0)] == ["2e12", "6.5e12", "1.2e20", "300"]



# Sized by hand from trainer/plan.py's formulas: the tiny preset at width 192 under ZeRO-1 in fp32 holds
# 192.6 MiB of model state on one worker (137.6 on 2, 110.1 on 4: weights, gradients, optimizer, EMA) and
# 4.66 MiB of activations per sample. 1.2 GiB leaves (1.2 - 1 GiB fixed) / 1.05 slack = 195 MiB: nothing
# on 1 worker, 12 samples on 2 -> micro-batch 8 (the largest dividing 64 / 2) x accumulation 4.
SIZED = {"grid": {"model.hidden_size": [192]}, "gpu_memory_gib": 1.2,
         "overrides": [*TINY, "train.zero_stage=1", "train.global_batch_size=64", "train.grad_accum=2",
                       "cluster.num_workers=1"]}


def test_gpu_memory_sizes_each_points_workers_and_accumulation(tmp_path):
    (point,) = expand(load_sweep(sweep_file(tmp_path, **SIZED)))
    assert (point.workers, point.micro_batch, point.grad_accum) == (2, 8, 4)
    assert "cluster.num_workers=2" in point.overrides and "train.grad_accum=4" in point.overrides
    (point,) = expand(load_sweep(sweep_file(tmp_path, **SIZED, min_workers_per_point=4, resources={"cpus": 2})))
    assert (point.workers, point.micro_batch, point.grad_accum, point.cpus_per_worker) == (4, 16, 1, 2.0)
    with pytest.raises(ConfigError, match=r"point hidden_size-192: no world size up to max_workers_per_point=8 "
                                          r"fits gpu_memory_gib=1.1: at 8 workers the plan needs 0.09 GiB"):
        expand(load_sweep(sweep_file(tmp_path, **{**SIZED, "gpu_memory_gib": 1.1})))


def test_sweep_plan_prints_a_row_per_point(tmp_path, capsys):
    from cluster.cli import main
    path = sweep_file(tmp_path, isoflop={"budgets": [1e11], "sizes": {"model.hidden_size": [64, 128]}},
                      grid={"model.family": ["crossflow", "cross_attention_fm"]})
    assert main(["sweep", "plan", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["point", "family", "params", "FLOPs/sample", "budget", "steps", "batch", "workers",
                                "micro", "accum", "GiB/GPU", "fits", "GPU", "hours"]
    rows = {line.split()[0]: line.split() for line in lines[3:7]}
    for p in expand(load_sweep(path)):
        assert rows[p.name][1] == p.cfg.model.family and rows[p.name][4:10] == [
            "1e11", str(p.steps), "16", "2", "8", "1"]  # shapes_tiny.yaml's 2 workers
        assert rows[p.name][-2:] == ["cpu", "-"]
    bad = sweep_file(tmp_path, grid={"model.hidden_size": [96]})
    assert main(["sweep", "plan", "--config", str(bad)]) == 2
    assert "point hidden_size-96: cannot build its model" in capsys.readouterr().err
