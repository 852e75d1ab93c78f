"""``crossflow sweep analyze``: synthetic sweeps written from known laws (tiny real configs, so the
meta-device models build; metrics.jsonl written here), the fits, isoFLOP minima, frontier and
extrapolation check recovered, the 2 sizes x 2 budgets path, the plots, bad run directories."""
import csv
import json
import math

import numpy as np
import pytest
import torch

from tests.support.tiny_models import tiny_text_encoder
from trainer.config import Config, ModelConfig
from trainer.models.crossflow.baselines import CrossAttentionFM, resolve_baseline_args
from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
from trainer.scaling_fits import fit_power_law, isoflop_minimum
from trainer.sweep_analysis import (SweepAnalysisError, analyze_sweep, choose_metrics, collect_runs, extrapolate_flops,
                                    frontier, isoflop_table, load_run)

STEPS, BATCH = 100, 16
PNG = b"\x89PNG\r\n\x1a\n"


def meta_model(family: str, hidden: int):
    """Built here independently of the analysis: 32 px images, 32-wide text (the tiny CLIP), 12 tokens."""
    mc = ModelConfig(preset="tiny", family=family, hidden_size=hidden)
    with torch.device("meta"):
        if family == "crossflow":
            return CrossFlow(resolve_args(mc, (3, 32, 32), 32, 12))
        return CrossAttentionFM(resolve_baseline_args(mc, (3, 32, 32), 32, 12))


def params_of(family: str, hidden: int) -> int:
    return meta_model(family, hidden).flow_params()


def write_run(run_dir, family: str, hidden: int, records: list[dict], steps: int = STEPS, target_flops: float = 0.0):
    cfg = Config()
    cfg.model.family, cfg.model.hidden_size = family, hidden
    cfg.data.text_encoder, cfg.data.max_tokens = tiny_text_encoder(), 12
    cfg.train.steps, cfg.train.global_batch_size = steps, BATCH
    cfg.optim.warmup_steps = 0
    cfg.log.wandb_group = root_group(run_dir)
    cfg.train.target_flops = target_flops  # the steps given are what the trainer derives from it
    raw = cfg.validate().to_dict()
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(raw))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def root_group(run_dir) -> str:
    """As a sweep sets it: one W&B group for every run, the sweep's name."""
    return f"sweep-{run_dir.parent.parent.name}"


def write_grid_run(run_dir, family: str, hidden: int, final_loss: float):
    """A fixed-length run whose training loss ends at ``final_loss`` (no validation loss)."""
    records = [{"step": s, "loss": final_loss * (1 + 2.0 * (1 - s / STEPS)), "flow_matching": final_loss * 0.9}
               for s in range(10, STEPS + 1, 10)]
    records.append({"step": STEPS, "shapes_eval/overall": 0.5})
    write_run(run_dir, family, hidden, records)


def assert_real_plot(path, min_colours: int = 4):
    """A PNG with more than axes on it: several colours, and not one flat image."""
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000, path
    img = (matplotlib.image.imread(str(path))[..., :3] * 255).astype(np.int64)  # (H, W, 3)
    colours = np.unique(img @ np.array([1 << 16, 1 << 8, 1]))  # one int per RGB
    assert len(colours) >= min_colours and img.std() > 10, path


# ----------------------------------------------------------------------------- a grid sweep
def write_grid_sweep(root):
    """CrossFlow at 5 widths with L = 50 N^-0.35 + 0.05; the baseline at 3 widths with L = 20 N^-0.25."""
    for h in (64, 128, 192, 256, 320):
        write_grid_run(root / f"crossflow_h{h}", "crossflow", h, 50 * params_of("crossflow", h) ** -0.35 + 0.05)
    for h in (64, 128, 256):
        write_grid_run(root / f"baseline_h{h}", "cross_attention_fm", h, 20 * params_of("cross_attention_fm", h) ** -0.25)
    return root


@pytest.fixture
def sweep(tmp_path):
    """A grid sweep of its own, for a test that changes it."""
    return write_grid_sweep(tmp_path / "sweep")


@pytest.fixture(scope="module")
def grid_analysis(tmp_path_factory):
    """The grid sweep analysed once (with the default 1000 resamples), for the tests that only read it."""
    return analyze_sweep(write_grid_sweep(tmp_path_factory.mktemp("grid") / "sweep"))


def test_grid_sweep_fits_and_extrapolates_L_of_N(grid_analysis):
    """No run logged val/loss: the training loss is fitted, and the report says so. L(N) is recovered;
    the extrapolation check (fit on the 4 or 2 smaller sizes, predict the largest) is near exact."""
    a = grid_analysis
    sweep = a.out_dir.parent
    assert a.metric == "loss" and "training loss" in a.metric_why and "no val/loss" in a.metric_why
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

    (check,) = a.extrapolation["crossflow"]["params"]["checks"]
    assert check["fit"]["form"] == "a*x^-alpha+c" and len(check["fit_runs"]) == 4
    (pred,) = check["predictions"]
    assert pred["run"] == "crossflow_h320" and abs(pred["rel_error"]) < 0.01
    (pred,) = a.extrapolation["cross_attention_fm"]["params"]["checks"][0]["predictions"]
    assert abs(pred["rel_error"]) < 1e-6  # a pure power law fitted on 2 sizes of a pure power law
    assert a.isoflops == {} and "no run has train.target_flops > 0" in a.report()

    out = sweep / "analysis"
    fit = json.loads((out / "fit.json").read_text())
    assert fit["metric"] == "loss" and fit["fits"]["loss"]["crossflow"]["params"]["alpha"] == pytest.approx(cf["alpha"])
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert len(rows) == 8 and {"family", "params", "flops", "target_flops", "final_loss",
                               "final_shapes_eval/overall"} <= set(rows[0])
    assert len(list(csv.DictReader((out / "curves.csv").open()))) == 8 * 11
    extrap = list(csv.DictReader((out / "extrapolation.csv").open()))
    assert {(e["family"], e["check"], e["run"]) for e in extrap} >= {("crossflow", "L(N)", "crossflow_h320"),
                                                                     ("cross_attention_fm", "L(N)", "baseline_h256")}
    for name in ("loss_vs_params", "loss_vs_flops", "curves_loss", "extrapolation_loss"):
        assert_real_plot(out / f"{name}.png")
    assert "alpha = 0.35" in a.report() and "L(N) [crossflow], 1600 samples" in a.report()


def test_cli_analyze_and_higher_is_better_metric(grid_analysis, tmp_path, capsys):
    from cluster.cli import main
    sweep = grid_analysis.out_dir.parent
    assert main(["sweep", "analyze", str(sweep), "--out", str(tmp_path / "out"), "--metric", "shapes_eval/overall",
                 "--bootstrap", "10"]) == 0
    printed = capsys.readouterr().out
    assert "shapes_eval/overall vs params [crossflow]" in printed and "metric: shapes_eval/overall" in printed
    assert (tmp_path / "out" / "shapes_eval_overall_vs_flops.png").is_file()
    assert "L(C) [crossflow]: not possible: the smaller sizes' shapes_eval/overall curves share no range" in printed
    assert json.loads((tmp_path / "out" / "fit.json").read_text())["fitted_as_error"] == ["shapes_eval/overall"]
    assert main(["sweep", "analyze", str(sweep), "--metric", "fid"]) == 1
    assert "metric 'fid' is in no run" in capsys.readouterr().out
    assert main(["sweep", "analyze", str(sweep), "--bootstrap", "0"]) == 1
    assert "bootstrap resamples must be >= 1, got 0" in capsys.readouterr().out


# ----------------------------------------------------------------------------- isoFLOP sweeps
# L(N, C) = E + A N^-alpha + B D^-beta with D = C / (6 N): minimising over N at a fixed C gives
# N_opt = G (C / 6)^a, a = beta / (alpha + beta), G = (alpha A / (beta B))^(1 / (alpha + beta)).
E, A, ALPHA, BETA = 0.3, 30.0, 0.34, 0.28
A_TRUE = BETA / (ALPHA + BETA)  # 0.4516
WIDTHS = (64, 128, 192, 256, 320, 384, 448)
BUDGETS = (3e12, 1e13, 3e13, 1e14)
G = 3e6 / (math.sqrt(BUDGETS[0] * BUDGETS[-1]) / 6) ** A_TRUE  # N_opt = 3M at the middle budget
B = ALPHA * A / (BETA * G ** (ALPHA + BETA))


def law(n: float, c: float) -> float:
    return E + A * n ** -ALPHA + B * (6 * n / c) ** BETA


def n_opt_true(c: float) -> float:
    return G * (c / 6) ** A_TRUE


def write_isoflop_sweep(root, widths, budgets, family="crossflow", points=10) -> None:
    """Each run at its budget, its steps derived from the model's FLOPs per sample as the trainer
    does; ``points`` val/loss records along the way from ``law`` at the FLOPs spent so far, and a
    training loss 5% above it with a deterministic wobble."""
    for h in widths:
        model = meta_model(family, h)
        n, per_sample = model.flow_params(), model.flops_per_sample()
        for budget in budgets:
            steps = round(budget / (per_sample * BATCH))
            records = []
            for i in range(1, points + 1):
                s = round(steps * i / points)
                val = law(n, s * BATCH * per_sample)
                records += [{"step": s, "loss": val * (1.05 + 0.02 * math.sin(s))}, {"step": s, "val/loss": val}]
            write_run(root / f"flops-{budget:.0e}_hidden_size-{h}", family, h, records, steps, budget)


@pytest.fixture(scope="module")
def isoflop_analysis(tmp_path_factory):
    root = tmp_path_factory.mktemp("isoflop") / "sweep"
    write_isoflop_sweep(root, WIDTHS, BUDGETS)
    return analyze_sweep(root)


def test_isoflop_sweep_recovers_the_frontier_exponent(isoflop_analysis):
    """7 sizes x 4 budgets from the known law: every minimum from a parabola, near the true N_opt;
    the frontier exponent near a = beta / (alpha + beta), inside its 90% bootstrap interval."""
    a = isoflop_analysis
    assert a.metric == "val/loss" and a.metric_why == "every run logged the validation loss"
    rows = a.isoflops["crossflow"]
    assert [row["budget"] for row in rows] == list(BUDGETS) and all(len(row["sizes"]) == 7 for row in rows)
    for row in rows:
        assert row["found_by"] == "parabola"
        assert row["n_opt"] == pytest.approx(n_opt_true(row["budget"]), rel=0.1)
        assert row["l_opt"] == pytest.approx(law(n_opt_true(row["budget"]), row["budget"]), rel=0.01)
    f = a.frontiers["crossflow"]
    boot = f["bootstrap"]
    assert f["a"] == pytest.approx(A_TRUE, abs=0.03)
    assert boot["resamples"] == 1000 and boot["lo"] < A_TRUE < boot["hi"] and boot["lo"] < boot["median"] < boot["hi"]
    assert boot["lo"] < f["a"] < boot["hi"]

    report = a.report()
    assert "metric: val/loss" in report and "frontier N_opt(C) [crossflow]" in report and "interval" in report
    assert "published DiT exponent 0.568 (" in report and "arXiv 2410.08184" in report
    fit = json.loads((a.out_dir / "fit.json").read_text())
    assert fit["frontier"]["crossflow"]["bootstrap"]["median"] == pytest.approx(boot["median"])
    assert "bootstrap_fits" not in fit["frontier"]["crossflow"]  # 2 x 1000 numbers stay out of the file
    table = list(csv.DictReader((a.out_dir / "isoflops.csv").open()))
    assert len(table) == 4 and table[0]["found_by"] == "parabola" and len(table[0]["sizes"].split()) == 7


def test_isoflop_sweep_extrapolation_check_and_plots(isoflop_analysis):
    """No L(N) check on isoFLOP runs (said why); the L(C) envelope of the 6 smaller sizes predicts the
    largest at each budget: close where it is near compute-optimal (the largest budget), above the
    prediction where it is too big for its budget. Every plot drawn."""
    a = isoflop_analysis
    checks = a.extrapolation["crossflow"]
    assert checks["params"]["checks"] == [] and "U-shaped" in checks["params"]["why_not"]
    f = checks["flops"]
    assert f["why_not"] == "" and len(f["fit_runs"]) == 6 * 4 and f["fit"]["form"] == "a*x^-alpha+c"
    preds = {p["run"]: p for p in f["predictions"]}
    assert len(preds) == 4
    largest = preds["flops-1e+14_hidden_size-448"]
    n = params_of("crossflow", 448)
    assert largest["measured"] == pytest.approx(law(n, largest["flops"]), rel=1e-9)
    assert abs(largest["rel_error"]) < 0.03
    assert all(p["predicted"] < p["measured"] for p in preds.values())  # too big for the smaller budgets
    assert "L(N) [crossflow]: not possible: isoFLOP runs only" in a.report()
    assert len(list(csv.DictReader((a.out_dir / "extrapolation.csv").open()))) == 4
    for name in ("curves", "isoflops", "frontier", "extrapolation"):
        assert_real_plot(a.out_dir / f"{name}_val_loss.png")


def test_two_sizes_two_budgets(tmp_path):
    """The issue's CPU sweep: 2 sizes x 2 budgets. Minima are measured argmins, flagged; the frontier
    is a line through 2 points with its bootstrap; L(N) cannot be checked (said why), the L(C)
    envelope of the smaller size's curves predicts the larger size. Then one run without val/loss:
    the training loss is used, and the report says why."""
    root = tmp_path / "sweep"
    write_isoflop_sweep(root, (64, 128), (1e12, 1e13), points=6)
    a = analyze_sweep(root, bootstrap_resamples=100)
    rows = a.isoflops["crossflow"]
    assert len(rows) == 2
    for row in rows:
        assert row["found_by"] == "measured argmin" and "2 sizes" in row["note"] and row["parabola"] is None
        assert row["n_opt"] in row["sizes"] and row["l_opt"] == min(row["losses"])
    f = a.frontiers["crossflow"]
    assert f["a"] is not None and f["bootstrap"]["resamples"] == 100 and "measured argmin" in f["note"]
    checks = a.extrapolation["crossflow"]
    assert "U-shaped" in checks["params"]["why_not"]
    preds = checks["flops"]["predictions"]
    assert [p["params"] for p in preds] == [params_of("crossflow", 128)] * 2 and len(checks["flops"]["fit_runs"]) == 2
    for p in preds:
        assert math.isfinite(p["rel_error"]) and p["rel_error"] == pytest.approx((p["predicted"] - p["measured"]) / p["measured"])
    report = a.report()
    assert "measured argmin: 2 sizes: too few for a parabola" in report and "L(C) [crossflow], envelope of 2" in report
    for name in ("curves", "isoflops", "frontier", "extrapolation"):
        assert_real_plot(a.out_dir / f"{name}_val_loss.png")

    assert json.loads((a.out_dir / "fit.json").read_text())["extrapolation"]["crossflow"]["params"]["why_not"]

    metrics = root / "flops-1e+12_hidden_size-64" / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines() if "val/loss" not in line))
    metric, why = choose_metrics(collect_runs(root)[0], None)
    assert metric == ["loss"] and "1 of 4 run(s) logged no val/loss (e.g. flops-1e+12_hidden_size-64)" in why

    with metrics.open("a") as f:  # the run diverged at its end: left out of the fits, not a crash
        f.write(json.dumps({"step": 999, "loss": float("nan")}) + "\n")
    runs = collect_runs(root)[0]
    assert [row["found_by"] for row in isoflop_table(runs, "loss")["crossflow"]] == ["one size", "measured argmin"]


def test_checks_that_cannot_be_made_say_why(tmp_path):
    """One size at one budget: no frontier, no extrapolation; each says why."""
    root = tmp_path / "sweep"
    write_isoflop_sweep(root, (64,), (1e12,), points=4)
    runs, _ = collect_runs(root)
    (row,) = isoflop_table(runs, "val/loss")["crossflow"]
    assert row["found_by"] == "one size"
    f = frontier([row], 10)
    assert f["a"] is None and "0 budget(s) with 2+ sizes" in f["note"] and f["budgets_left_out"] == [1e12]
    assert "the check needs 2 or more" in extrapolate_flops(runs, "val/loss", "crossflow")["why_not"]


# ----------------------------------------------------------------------------- bad inputs
def test_bad_run_is_named_or_skipped(sweep):
    bad = sweep / "crossflow_h192" / "metrics.jsonl"
    bad.write_text(bad.read_text() + '{"step": 110, "loss": 0.1\n')  # truncated line
    with pytest.raises(SweepAnalysisError, match=r"crossflow_h192/metrics.jsonl: line 12 is not valid JSON"):
        collect_runs(sweep)
    (sweep / "baseline_h64" / "metrics.jsonl").unlink()
    runs, skipped = collect_runs(sweep, skip_bad=True)
    assert len(runs) == 6 and sorted(n for n, _ in skipped) == ["baseline_h64", "crossflow_h192"]
    assert any("metrics.jsonl is missing" in why for _, why in skipped)
    a = analyze_sweep(sweep, skip_bad=True, bootstrap_resamples=10)
    assert a.fits["loss"]["cross_attention_fm"]["params"]["n_points"] == 2
    assert "2 size(s), L(N) needs 3" in a.extrapolation["cross_attention_fm"]["params"]["why_not"]
    assert a.fits["loss"]["crossflow"]["params"]["form"] == "a*x^-alpha+c"  # still 4 runs
    assert len(json.loads((sweep / "analysis" / "fit.json").read_text())["skipped"]) == 2
    assert "skipped baseline_h64" in a.report()

    config = sweep / "crossflow_h64" / "config.json"
    raw = json.loads(config.read_text())
    raw["train"]["target_flops"] = "lots"
    config.write_text(json.dumps(raw))
    with pytest.raises(SweepAnalysisError, match=r"crossflow_h64/config.json: not a valid crossflow config "
                                                 r"\(train.target_flops: expected float, got 'lots'"):
        load_run(sweep / "crossflow_h64")
    with pytest.raises(SweepAnalysisError, match="sweep directory not found"):
        collect_runs(sweep / "nowhere")


def test_fit_degenerate_inputs():
    assert fit_power_law([1e6], [1.0])["form"] is None
    assert fit_power_law([1e6, 2e6], [1.0, -1.0])["form"] is None
    f = fit_power_law([1e6, 4e6], [2.0, 1.0])
    assert f["form"] == "a*x^-alpha" and f["alpha"] == pytest.approx(0.5)
    sizes = [1e5, 1e6, 1e7]
    edge = isoflop_minimum(sizes, [3.0, 2.0, 1.5])  # convex, still falling at the largest size
    assert edge["found_by"] == "measured argmin" and edge["n_opt"] == 1e7 and "outside the measured" in edge["note"]
    assert isoflop_minimum(sizes, [1.0, 2.0, 1.5])["found_by"] == "measured argmin"  # a maximum, not a minimum
    assert isoflop_minimum(sizes, [2.0, 1.0, 2.0])["n_opt"] == pytest.approx(1e6)


def test_wandb_offline(isoflop_analysis, monkeypatch):
    """Tables, plots and the headline numbers into one offline W&B run of the sweep's group."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    from trainer.sweep_analysis import log_to_wandb, summary_numbers
    run_dir = log_to_wandb(isoflop_analysis, group="test-sweep")
    assert len(list(run_dir.glob("*.wandb"))) == 1
    media = run_dir / "files" / "media"
    assert {p.name.split("_0_")[0] for p in (media / "table").iterdir()} == {"runs", "isoflops", "extrapolation"}
    assert {p.name.split("_0_")[0] for p in (media / "images").iterdir()} == {
        "val_loss_vs_params", "val_loss_vs_flops", "curves_val_loss", "isoflops_val_loss", "frontier_val_loss",
        "extrapolation_val_loss"}
    assert isoflop_analysis.wandb_group == root_group(isoflop_analysis.out_dir)  # what --wandb logs into by default
    summary = summary_numbers(isoflop_analysis)
    assert summary["metric"] == "val/loss" and summary["frontier/reference_a"] == 0.568
    assert summary["frontier/crossflow/a_lo"] < summary["frontier/crossflow/a"] < summary["frontier/crossflow/a_hi"]
    assert "extrapolation/crossflow/L(C)/flops-1e+14_hidden_size-448/rel_error" in summary
