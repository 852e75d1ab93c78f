"""``crossflow sweep analyze --ablation-table``: run folders written here (config.json from the real
Config, metrics.jsonl with known finals) -> variants found from the configs, mean ± std over seeds,
one row per guidance scale, the paper's numbers, ablation.md / ablation.csv."""
import csv
import json
import math

import pytest

from trainer.ablation_table import ablation_table, scores_by_scale
from trainer.config import Config

TASKS = ("object", "count", "color", "position", "size")


def write_run(root, name: str, values: dict, finals: dict):
    """A finished run: its config (defaults + ``values``, as the sweep would set them) and its metrics."""
    cfg = Config()
    for key, value in {**values, "train.out_dir": str(root / name), "log.wandb_name": name}.items():
        section, field = key.split(".")
        setattr(getattr(cfg, section), field, value)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.validate().to_dict()))
    records = [{"step": 10, "loss": 1.0}, {"step": 20, "loss": 0.5, "val/loss": 9.0},  # an earlier val/loss
               {"step": 20, **finals}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def shapes(overall: float, prefix: str = "shapes_eval/", suffix: str = "") -> dict:
    scores = {"overall": overall, "overall_heldout": overall / 2, **{t: 0.5 for t in TASKS}}
    return {f"{prefix}{k}{suffix}": v for k, v in scores.items()}


def test_contrastive_ablation_groups_seeds_and_shows_the_paper(tmp_path, capsys):
    """Two variants (contrastive weight 0.1 = the paper's image-text, 0 = none) x 3 seeds: the seed is
    no variant, mean ± sample std per variant, 33.41 beside image-text, n/a beside none."""
    sweep = tmp_path / "ablation_contrastive"
    overall = {0.1: [0.2, 0.3, 0.4], 0.0: [0.1, 0.1, 0.1]}
    for weight, scores in overall.items():
        for seed, score in enumerate(scores):
            write_run(sweep, f"w{weight}_seed-{seed}", {"objective.contrastive_weight": weight, "train.seed": seed},
                      {**shapes(score), "val/loss": 0.1 * (seed + 1)})
    from cluster.cli import main
    assert main(["sweep", "analyze", str(sweep), "--ablation-table"]) == 0
    printed = capsys.readouterr().out
    table = ablation_table(sweep)
    assert table.ablation == "contrastive" and table.keys == ["objective.contrastive_weight"]
    none, image_text = table.rows  # sorted by the variant's values
    assert (none.variant, none.paper, len(none.runs)) == ("none", "n/a", 3)
    assert (image_text.variant, image_text.paper) == ("image-text", "33.41")
    s = image_text.stats["overall"]
    assert s.n == 3 and s.mean == pytest.approx(0.3) and s.std == pytest.approx(0.1)
    assert image_text.stats["held-out"].mean == pytest.approx(0.15)
    assert image_text.stats["val/loss"].mean == pytest.approx(0.2)  # the last val/loss, not the earlier 9.0
    assert none.stats["overall"].std == pytest.approx(0.0)
    assert "| image-text | 0.1 | 3 | 3 | 0.300 ± 0.100 | 0.150 ± 0.050 |" in printed
    assert "| none | 0.0 | 3 | 3 | 0.100 ± 0.000 |" in printed and printed.rstrip().endswith("ablation.csv")
    assert (sweep / "analysis" / "ablation.md").read_text() == table.markdown
    rows = list(csv.DictReader((sweep / "analysis" / "ablation.csv").open()))
    assert [(r["variant"], r["overall_mean"], r["seeds"]) for r in rows][1] == ("image-text", "0.3", "3")
    assert rows[0]["paper_fid10k_70m"] == "n/a" and rows[1]["runs"].split() == [f"w0.1_seed-{i}" for i in range(3)]


def test_cfg_ablation_has_a_row_per_scale(tmp_path):
    """One training per seed scored at several guidance scales: a row per scale; the plain scores are
    sample.cfg_scale's (the same as its named scale here); val/loss is the run's one value."""
    sweep = tmp_path / "ablation_cfg"
    for seed in (0, 1):
        finals = {**shapes(0.1 + seed * 0.1, suffix="@cfg1"), **shapes(0.5, suffix="@cfg3"),
                  **shapes(0.5), **shapes(0.3 + seed * 0.2, suffix="@cfg1.5"), "val/loss": 0.25}
        write_run(sweep, f"seed-{seed}", {"train.seed": seed, "sample.cfg_scale": 3.0}, finals)
    table = ablation_table(sweep, tmp_path / "out")
    assert table.ablation == "cfg" and table.keys == []
    assert [(r.cfg_scale, r.variant, r.paper) for r in table.rows] == [
        (1.0, "no guidance", "33.41"), (1.5, "indicator CFG", "24.33"), (3.0, "indicator CFG", "24.33")]
    assert table.rows[0].stats["overall"].mean == pytest.approx(0.15)
    assert table.rows[1].stats["overall"].std == pytest.approx(math.sqrt(0.02))
    assert all(r.stats["val/loss"].mean == 0.25 and r.stats["val/loss"].n == 2 for r in table.rows)
    assert "| no guidance | 1 | 2 |" in table.markdown and "not per scale" in table.markdown
    assert (tmp_path / "out" / "ablation.csv").is_file()


def test_scores_by_scale_without_shapes_eval_and_a_default_scale_not_named():
    cfg = {"sample.cfg_scale": 2.0}
    assert scores_by_scale(cfg, {"val/loss": 0.3}) == {2.0: {"val/loss": 0.3}}
    got = scores_by_scale(cfg, {"shapes_eval/overall": 0.4, "shapes_eval/overall@cfg5": 0.6})
    assert got == {2.0: {"shapes_eval/overall": 0.4}, 5.0: {"shapes_eval/overall": 0.6}}


def test_baseline_sizes_and_one_seed(tmp_path, capsys):
    """Family x width, one seed each: no std, the variant named by its values, n/a for the paper."""
    sweep = tmp_path / "sizes"
    for family in ("crossflow", "cross_attention_fm"):
        for width in (64, 128):
            write_run(sweep, f"{family}_{width}", {"model.family": family, "model.hidden_size": width},
                      {"val/loss": width / 1000})
    table = ablation_table(sweep)
    assert table.ablation == "baseline" and table.keys == ["model.family", "model.hidden_size"]
    assert [r.variant for r in table.rows] == ["family=cross_attention_fm, hidden_size=64",
                                               "family=cross_attention_fm, hidden_size=128",
                                               "family=crossflow, hidden_size=64", "family=crossflow, hidden_size=128"]
    assert table.rows[0].stats["val/loss"].format(4) == "0.0640" and table.rows[0].stats["overall"].format(3) == "-"
    assert all(r.paper == "n/a" for r in table.rows) and "FID-30K 10.13 vs 10.79" in table.markdown
    from cluster.cli import main
    assert main(["sweep", "analyze", str(tmp_path / "nothing"), "--ablation-table"]) == 1
    assert "sweep directory not found" in capsys.readouterr().out
    (sweep / "crossflow_64" / "config.json").write_text("{not json")
    assert main(["sweep", "analyze", str(sweep), "--ablation-table"]) == 1
    assert "crossflow_64/config.json: not valid JSON" in capsys.readouterr().out


def test_two_stage_and_text_ve_variants_are_named_as_the_paper_does(tmp_path):
    sweep = tmp_path / "two_stage"
    for name, values in {"joint": {"objective.ve_pretrain_steps": 0},
                         "two": {"objective.ve_pretrain_steps": 2, "train.steps": 6},
                         "two_ft": {"objective.ve_pretrain_steps": 2, "objective.ve_finetune": True, "train.steps": 6}
                         }.items():
        write_run(sweep, name, {**values, "sample.cfg_scale": 1.0}, {"val/loss": 0.5})
    table = ablation_table(sweep)
    assert table.ablation == "two_stage"
    assert [(r.variant, r.paper) for r in table.rows] == [
        ("joint", "24.33"), ("two-stage", "32.55"), ("two-stage + joint fine-tuning", "23.79")]
    sweep = tmp_path / "text_ve"
    for ve in ("variational", "deterministic"):
        write_run(sweep, ve, {"model.text_ve": ve}, {"val/loss": 0.5})
    assert [(r.variant, r.paper) for r in ablation_table(sweep).rows] == [("deterministic", "n/a"),
                                                                          ("variational", "n/a")]
