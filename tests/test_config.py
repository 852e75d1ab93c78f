import math
from pathlib import Path

import pytest

from cluster.cli import main
from trainer.config import ConfigError, load_config, per_rank_batch_size

REPO = Path(__file__).resolve().parents[1]


def test_defaults_validate():
    cfg = load_config()
    assert cfg.model.preset == "tiny" and cfg.objective.sigma_min == 1e-5


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\ntrain:\n  steps: 7\n")
    cfg = load_config(path, ["optim.lr=3e-4", "--train.global_batch_size=16", "optim.betas=[0.9, 0.95]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.steps == 7 and cfg.train.global_batch_size == 16
    assert cfg.optim.betas == [0.9, 0.95]


def test_int_widens_to_float():
    assert load_config(None, ["objective.kl_weight=1"]).objective.kl_weight == 1.0


@pytest.mark.parametrize("override, key", [
    ("optim.learning_rate=1e-3", "optim.learning_rate"),
    ("trian.steps=3", "trian"),
    ("train.steps=many", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("objective.kl_weight=yes", "objective.kl_weight"),
    ("model.preset=enormous", "model.preset"),
    ("optim.betas=0.9", "optim.betas"),
    ("train.global_batch_size=-4", "train.global_batch_size"),
    ("objective.uncond_prob=1.5", "objective.uncond_prob"),
    ("eval.cfg_scales=3", "eval.cfg_scales"),
    ("eval.cfg_scales=[1, -2]", "eval.cfg_scales"),
    ("eval.cfg_scales=[3, 3.0]", "repeated"),
])
def test_bad_keys_and_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_cfg_scales_need_the_shapes_eval_and_name_their_metrics():
    from trainer.config import cfg_scale_name
    assert load_config(None, ["eval.cfg_scales=[1, 1.5, 7]"]).eval.cfg_scales == [1.0, 1.5, 7.0]
    assert [cfg_scale_name(s) for s in (1.0, 1.5, 7)] == ["cfg1", "cfg1.5", "cfg7"]
    with pytest.raises(ConfigError, match="eval.cfg_scales.*eval.shapes=False"):
        load_config(None, ["eval.cfg_scales=[1, 3]", "eval.shapes=false"])


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  depht: 3\n")
    with pytest.raises(ConfigError, match="model.depht"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_per_rank_batch():
    assert per_rank_batch_size(64, 2, 2) == 16
    with pytest.raises(ConfigError, match="global_batch_size"):
        per_rank_batch_size(10, 4)


TRAINING_CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*.yaml")
                          if p.parent.name not in ("cluster", "sweeps"))


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=str)
def test_every_shipped_config_parses(path):
    """Through the real entry point, so a stale config fails CI."""
    assert main(["config", "--config", str(REPO / path)]) == 0


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "configs" / "cluster").glob("*.yaml")))
def test_every_cluster_preset_parses(preset):
    assert main(["config", f"cluster.preset={preset}"]) == 0


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_expands_to_valid_configs(path, monkeypatch):
    from trainer.sweep_spec import expand, load_sweep
    monkeypatch.chdir(REPO)
    spec = load_sweep(path)
    runs = expand(spec)  # validates every run's config, steps from FLOP budgets, workers x micro-batch
    iso = spec.isoflop
    expected = (math.prod(len(v) for v in spec.grid.values()) * (len(iso.budgets) * iso.num_sizes if iso else 1)
                * max(1, len(spec.variants)))
    assert len(runs) == expected and len({r.name for r in runs}) == expected
    if path.name.startswith("ablation_"):  # issue 16: several seeds per variant, validation and ShapesEval on
        assert spec.grid["train.seed"] == [0, 1, 2]
        assert all(r.cfg.eval.val_every > 0 and r.cfg.eval.shapes for r in runs)
        assert spec.out_dir == f"runs/sweeps/{path.stem}" and f"sweep run --config configs/sweeps/{path.name}" \
            in path.read_text()


def test_cli_reports_bad_key(capsys):
    assert main(["config", "train.stepz=3"]) == 2
    assert "train.stepz" in capsys.readouterr().err
