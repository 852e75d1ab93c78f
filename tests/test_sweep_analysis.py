"""``crossflow sweep analyze``: synthetic sweeps with known power laws, outputs, bad run directories."""
import csv
import json

import pytest
import torch

from trainer.config import Config, ModelConfig
from trainer.models.crossflow.baselines import CrossAttentionFM, resolve_baseline_args
from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
from trainer.sweep_analysis import SweepAnalysisError, analyze_sweep, collect_runs, fit_power_law

STEPS, BATCH = 100, 16


def params_of(family: str, hidden: int) -> int:
    """Computed here independently of the analysis: 32 px images, hashed-words-32 text, 12 tokens."""
    mc = ModelConfig(preset="tiny", family=family, hidden_size=hidden)
    with torch.device("meta"):
        if family == "crossflow":
            return CrossFlow(resolve_args(mc, (3, 32, 32), 32, 12)).flow_params()
        return CrossAttentionFM(resolve_baseline_args(mc, (3, 32, 32), 32, 12)).flow_params()


def write_run(run_dir, family: str, hidden: int, final_loss: float, steps: int = STEPS):
    cfg = Config()
    cfg.model.family, cfg.model.hidden_size = family, hidden
    cfg.data.text_encoder, cfg.data.max_tokens = "hashed-words-32", 12
    cfg.train.steps, cfg.train.global_batch_size = steps, BATCH
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.validate().to_dict()))
    records = [{"step": s, "loss": final_loss * (1 + 2.0 * (1 - s / steps)), "flow_matching": final_loss * 0.9}
               for s in range(10, steps + 1, 10)]
    records.append({"step": steps, "shapes_eval/overall": 0.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "summary.json").write_text(json.dumps({"steps": steps, "final_loss": final_loss}))


@pytest.fixture
def sweep(tmp_path):
    """CrossFlow at 5 widths with L = 50 N^-0.35 + 0.05; the baseline at 3 widths with L = 20 N^-0.25."""
    root = tmp_path / "sweep"
    for h in (64, 128, 192, 256, 320):
        write_run(root / f"crossflow_h{h}", "crossflow", h, 50 * params_of("crossflow", h) ** -0.35 + 0.05)
    for h in (64, 128, 256):
        write_run(root / f"baseline_h{h}", "cross_attention_fm", h, 20 * params_of("cross_attention_fm", h) ** -0.25)
    return root


def test_fit_recovers_exponents_and_writes_outputs(sweep):
    a = analyze_sweep(sweep)
    assert [r.params for r in a.runs if r.family == "crossflow"] == [params_of("crossflow", h)
                                                                     for h in (64, 128, 192, 256, 320)]
    r = a.runs[-1]
    assert r.steps == STEPS and r.samples == STEPS * BATCH and r.flops == pytest.approx(r.flops_per_sample * STEPS * BATCH)
    cf = a.fits["loss"]["crossflow"]["params"]
    assert cf["form"] == "a*x^-alpha+c" and cf["n_points"] == 5
    assert cf["alpha"] == pytest.approx(0.35, abs=0.02) and cf["c"] == pytest.approx(0.05, abs=0.01)
    base = a.fits["loss"]["cross_attention_fm"]["params"]
    assert base["form"] == "a*x^-alpha" and "exactly determined" in base["note"]  # 3 points: pure power law
    assert base["alpha"] == pytest.approx(0.25, abs=1e-6) and base["a"] == pytest.approx(20, rel=1e-4)
    assert a.fits["loss"]["crossflow"]["flops"]["form"] == "a*x^-alpha+c"

    out = sweep / "analysis"
    fit = json.loads((out / "fit.json").read_text())
    assert fit["fits"]["loss"]["crossflow"]["params"]["alpha"] == pytest.approx(cf["alpha"])
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 8 and {"family", "params", "flops", "final_loss", "final_shapes_eval/overall"} <= set(rows[0])
    assert len(list(csv.DictReader((out / "curves.csv").open()))) == 8 * 11
    for name in ("loss_vs_params", "loss_vs_flops", "flow_matching_vs_params", "flow_matching_vs_flops"):
        png = (out / f"{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "alpha = 0.35" in a.report()


def test_cli_analyze_and_higher_is_better_metric(sweep, capsys):
    from cluster.cli import main
    assert main(["sweep", "analyze", str(sweep), "--out", str(sweep / "out"), "--metric", "shapes_eval/overall"]) == 0
    printed = capsys.readouterr().out
    assert "shapes_eval/overall vs params [crossflow]" in printed
    assert (sweep / "out" / "shapes_eval_overall_vs_flops.png").is_file()
    assert json.loads((sweep / "out" / "fit.json").read_text())["fitted_as_error"] == ["shapes_eval/overall"]
    assert main(["sweep", "analyze", str(sweep), "--metric", "fid"]) == 1
    assert "metric 'fid' is in no run" in capsys.readouterr().out


def test_bad_run_is_named_or_skipped(sweep):
    bad = sweep / "crossflow_h192" / "metrics.jsonl"
    bad.write_text(bad.read_text() + '{"step": 110, "loss": 0.1\n')  # truncated line
    with pytest.raises(SweepAnalysisError, match=r"crossflow_h192/metrics.jsonl: line 12 is not valid JSON"):
        collect_runs(sweep)
    (sweep / "baseline_h64" / "metrics.jsonl").unlink()
    runs, skipped = collect_runs(sweep, skip_bad=True)
    assert len(runs) == 6 and sorted(n for n, _ in skipped) == ["baseline_h64", "crossflow_h192"]
    assert any("metrics.jsonl is missing" in why for _, why in skipped)
    a = analyze_sweep(sweep, skip_bad=True)
    assert a.fits["loss"]["cross_attention_fm"]["params"]["n_points"] == 2
    assert a.fits["loss"]["crossflow"]["params"]["form"] == "a*x^-alpha+c"  # still 4 runs
    assert len(json.loads((sweep / "analysis" / "fit.json").read_text())["skipped"]) == 2
    assert "skipped baseline_h64" in a.report()


def test_fit_degenerate_inputs():
    assert fit_power_law([1e6], [1.0])["form"] is None
    assert fit_power_law([1e6, 2e6], [1.0, -1.0])["form"] is None
    f = fit_power_law([1e6, 4e6], [2.0, 1.0])
    assert f["form"] == "a*x^-alpha" and f["alpha"] == pytest.approx(0.5)


def test_wandb_offline(sweep, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from trainer.sweep_analysis import log_to_wandb
    a = analyze_sweep(sweep)
    run_dir = log_to_wandb(a, group="test-sweep")
    assert run_dir.is_dir() and list(run_dir.glob("*.wandb"))
