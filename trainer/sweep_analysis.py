"""Scaling-law analysis of a sweep: one run directory per run (each written by ``trainer.loop.train``)
-> a table, fitted laws and plots. Pure: no Ray, no training, no GPU.

Per run it reads ``config.json`` (the resolved config), ``metrics.jsonl`` and ``summary.json`` (optional),
and derives the model's size and cost by building it on the meta device from the config:
    N = flow-network parameters (``flow_params()``, as the paper counts model size)
    C = training FLOPs = flops_per_sample() * samples seen (steps x global batch)

For each family and metric it fits, in log space,
    L(X) = a X^-alpha + c      (X = N, or X = C)  with 4 or more runs, c in [0, min L)
    L(X) = a X^-alpha          with 2 or 3 runs: the saturating form has 3 parameters and would pass
                               exactly through 3 points, so nothing would be learned about its fit
and says which form it used. Metrics where higher is better (ShapesEval, CLIP score) are fitted as
an error, 1 - score.

Outputs, in ``<sweep>/analysis`` by default: ``runs.csv`` (one row per run, final values),
``curves.csv`` (every logged record with its FLOPs so far), ``fit.json``, and per metric
``<metric>_vs_params.png`` and ``<metric>_vs_flops.png`` (log-log, points, fitted curve, one
series per family; the FLOPs plot also draws each run's training curve).

A run directory with a missing or corrupt ``config.json`` or ``metrics.jsonl`` raises
``SweepAnalysisError`` naming the file; with ``skip_bad=True`` it is skipped and listed instead
(in the return value and in ``fit.json``).
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_METRICS = ("loss", "flow_matching")
HIGHER_IS_BETTER = ("shapes_eval/", "clip")  # metric-name prefixes fitted as 1 - score
MIN_POINTS_SATURATING = 4  # a N^-alpha + c has 3 parameters: fit it only when it is over-determined


class SweepAnalysisError(RuntimeError):
    """A run directory cannot be analysed; the message names it and the file at fault."""


@dataclass
class RunResult:
    """One run of the sweep: its size, its cost and its metrics."""
    name: str
    family: str
    preset: str
    params: int
    flops_per_sample: float
    steps: int
    global_batch: int
    final: dict[str, float]  # metric -> last logged value
    records: list[dict] = field(repr=False, default_factory=list)  # metrics.jsonl, in order

    @property
    def samples(self) -> int:
        return self.steps * self.global_batch

    @property
    def flops(self) -> float:
        return self.flops_per_sample * self.samples


# ----------------------------------------------------------------------------- reading runs
def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file; a line that is not a JSON object raises, naming the line."""
    records = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SweepAnalysisError(f"{path}: line {i} is not valid JSON ({e.msg})") from e
        if not isinstance(rec, dict):
            raise SweepAnalysisError(f"{path}: line {i} is not a JSON object")
        records.append(rec)
    return records


def text_dim_of(spec: str) -> int:
    """Width of the text encoder's token embeddings, without loading its weights when possible."""
    from data_pipeline.features import load_text_encoder, text_encoder_dim
    return text_encoder_dim(spec) or load_text_encoder(spec).dim


def model_on_meta(cfg):
    """The run's model built on the meta device (no memory, no init cost)."""
    import torch

    from trainer.model_input import declared_model_input
    from trainer.models.families import model_from_args, resolve_model_args
    model_input = declared_model_input(cfg, text_dim_of(cfg.data.text_encoder))  # as training decides it
    args = resolve_model_args(cfg.model, model_input.latent_shape, model_input.text_dim, cfg.data.max_tokens,
                              cfg.objective.contrastive_init_temperature)
    with torch.device("meta"):
        return model_from_args(args)


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f).exists() for f in ("config.json", "metrics.jsonl", "summary.json"))


def load_run(run_dir: Path) -> RunResult:
    """One run directory -> RunResult; raises SweepAnalysisError naming the missing or bad file."""
    from trainer.config import ConfigError, config_from_dict
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise SweepAnalysisError(f"run {run_dir}: {path.name} is missing")
    try:
        cfg = config_from_dict(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise SweepAnalysisError(f"{config_path}: not a valid crossflow config ({e})") from e
    records = read_jsonl(metrics_path)
    if not any("loss" in r for r in records):
        raise SweepAnalysisError(f"{metrics_path}: no training record (no 'loss' in any line)")
    for i, r in enumerate(records, start=1):
        if not isinstance(r.get("step"), int):
            raise SweepAnalysisError(f"{metrics_path}: record {i} has no integer 'step'")
    final: dict[str, float] = {}
    for r in records:  # later records win: the last value of each metric
        final.update({k: float(v) for k, v in r.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    steps = max(r["step"] for r in records if "loss" in r)
    model = model_on_meta(cfg)
    return RunResult(name=run_dir.name, family=cfg.model.family, preset=cfg.model.preset,
                     params=int(model.flow_params()), flops_per_sample=float(model.flops_per_sample()),
                     steps=steps, global_batch=cfg.train.global_batch_size, final=final, records=records)


def collect_runs(sweep_dir: str | Path, skip_bad: bool = False) -> tuple[list[RunResult], list[tuple[str, str]]]:
    """Every run directory directly under ``sweep_dir`` (one holding config.json, metrics.jsonl or
    summary.json). Returns (runs sorted by family and size, skipped as (name, reason))."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepAnalysisError(f"sweep directory not found: {sweep_dir}")
    runs, skipped = [], []
    for run_dir in sorted(p for p in sweep_dir.iterdir() if is_run_dir(p)):
        try:
            runs.append(load_run(run_dir))
        except SweepAnalysisError as e:
            if not skip_bad:
                raise
            skipped.append((run_dir.name, str(e)))
    if not runs:
        raise SweepAnalysisError(f"{sweep_dir}: no analysable run directory (each needs config.json and metrics.jsonl)"
                                 + (f"; skipped: {skipped}" if skipped else ""))
    runs.sort(key=lambda r: (r.family, r.params, r.name))
    return runs, skipped


# ----------------------------------------------------------------------------- fitting
def fitted_value(metric: str, value: float) -> float:
    """What is fitted for ``metric``: the value itself, or 1 - score where higher is better."""
    return 1.0 - value if metric.startswith(HIGHER_IS_BETTER) else value


def fit_power_law(x, y) -> dict:
    """Fit y = a x^-alpha + c (4+ points) or y = a x^-alpha (2-3 points) in log space.

    Returns {"form", "a", "alpha", "c", "n_points", "rmse_log", "note"}; with fewer than 2 points
    or a non-positive y, {"form": None, "note": why}."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2 or len(np.unique(x)) < 2:
        return {"form": None, "n_points": n, "note": "fewer than 2 distinct sizes: nothing to fit"}
    if np.any(y <= 0) or np.any(x <= 0):
        return {"form": None, "n_points": n, "note": "non-positive values: no power law in log space"}
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)  # pure power law: log y = log a - alpha log x
    pure = {"form": "a*x^-alpha", "a": float(math.exp(intercept)), "alpha": float(-slope), "c": 0.0,
            "n_points": n, "rmse_log": float(np.sqrt(np.mean((intercept + slope * lx - ly) ** 2)))}
    if n < MIN_POINTS_SATURATING:
        pure["note"] = (f"{n} points: a*x^-alpha + c has 3 parameters and would be exactly determined, "
                        "so the pure power law a*x^-alpha was fitted instead")
        return pure
    from scipy.optimize import curve_fit
    x0 = float(np.exp(lx.mean()))  # fit in x / x0 so a is of the order of y

    def log_model(lxn, log_a, alpha, c):
        return np.log(np.exp(log_a - alpha * lxn) + c)

    c_max = float(y.min()) * (1 - 1e-6)  # the floor lies below every observed value
    alpha0 = min(max(pure["alpha"], 1e-3), 5.0)
    p0 = [math.log(max(float(y.min()) * 0.5, 1e-12)), alpha0, 0.5 * c_max]
    try:
        (log_a, alpha, c), _ = curve_fit(log_model, lx - math.log(x0), ly, p0=p0,
                                         bounds=([-50.0, 0.0, 0.0], [50.0, 10.0, c_max]), maxfev=20000)
    except (RuntimeError, ValueError) as e:
        pure["note"] = f"a*x^-alpha + c did not converge ({e}); the pure power law was fitted instead"
        return pure
    resid = log_model(lx - math.log(x0), log_a, alpha, c) - ly
    return {"form": "a*x^-alpha+c", "a": float(math.exp(log_a) * x0 ** alpha), "alpha": float(alpha),
            "c": float(c), "n_points": n, "rmse_log": float(np.sqrt(np.mean(resid ** 2))),
            "note": f"{n} points, fitted in log space with c in [0, min y)"}


def predict(fit: dict, x) -> np.ndarray:
    return fit["a"] * np.asarray(x, dtype=np.float64) ** -fit["alpha"] + fit["c"]


def fit_sweep(runs: list[RunResult], metrics) -> dict:
    """{metric: {family: {"params": fit, "flops": fit}}} over the runs that logged the metric."""
    out: dict = {}
    for metric in metrics:
        per_family: dict = {}
        for family in sorted({r.family for r in runs}):
            rs = [r for r in runs if r.family == family and metric in r.final]
            if not rs:
                continue
            y = [fitted_value(metric, r.final[metric]) for r in rs]
            per_family[family] = {"params": fit_power_law([r.params for r in rs], y),
                                  "flops": fit_power_law([r.flops for r in rs], y),
                                  "runs": [r.name for r in rs]}
        if per_family:
            out[metric] = per_family
    return out


# ----------------------------------------------------------------------------- outputs
def write_runs_csv(runs: list[RunResult], path: Path) -> list[str]:
    """One row per run; returns the metric columns (every metric any run logged, sorted)."""
    metric_cols = sorted({k for r in runs for k in r.final})
    head = ["run", "family", "preset", "params", "flops_per_sample", "steps", "global_batch", "samples", "flops"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head + [f"final_{m}" for m in metric_cols] + ["first_loss"])
        for r in runs:
            first = next(rec["loss"] for rec in r.records if "loss" in rec)
            w.writerow([r.name, r.family, r.preset, r.params, f"{r.flops_per_sample:.6g}", r.steps, r.global_batch,
                        r.samples, f"{r.flops:.6g}"] + [r.final.get(m, "") for m in metric_cols] + [first])
    return metric_cols


def write_curves_csv(runs: list[RunResult], path: Path) -> None:
    """Every logged record (training and evaluation) with the samples and FLOPs spent by its step."""
    keys = sorted({k for r in runs for rec in r.records for k in rec if k != "step"})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "family", "params", "step", "samples", "flops"] + keys)
        for r in runs:
            for rec in r.records:
                s = rec["step"] * r.global_batch
                w.writerow([r.name, r.family, r.params, rec["step"], s, f"{s * r.flops_per_sample:.6g}"]
                           + [rec.get(k, "") for k in keys])


def _slug(metric: str) -> str:
    return metric.replace("/", "_")


def plot_metric(runs: list[RunResult], metric: str, fits: dict, axis: str, path: Path) -> None:
    """Log-log ``metric`` against params or FLOPs: points, fitted curve, one colour per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    label = f"1 - {metric}" if metric.startswith(HIGHER_IS_BETTER) else metric
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, family in enumerate(sorted({r.family for r in runs})):
        color = f"C{i}"
        rs = [r for r in runs if r.family == family and metric in r.final]
        if not rs:
            continue
        xs = [r.params if axis == "params" else r.flops for r in rs]
        ys = [fitted_value(metric, r.final[metric]) for r in rs]
        if axis == "flops":  # each run's curve, FLOPs spent so far at each logged step
            for r in rs:
                pts = [(rec["step"] * r.global_batch * r.flops_per_sample, fitted_value(metric, rec[metric]))
                       for rec in r.records if metric in rec and rec["step"] > 0]
                pts = [(px, py) for px, py in pts if py > 0]
                if pts:
                    ax.plot(*zip(*pts), color=color, alpha=0.25, linewidth=1)
        ax.scatter(xs, [max(v, 1e-12) for v in ys], color=color, zorder=3, label=family)
        fit = fits.get(metric, {}).get(family, {}).get(axis, {})
        if fit.get("form"):
            grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 100)
            tail = f" + {fit['c']:.3g}" if fit["form"].endswith("+c") else ""
            ax.plot(grid, predict(fit, grid), color=color, linestyle="--",
                    label=f"{family}: {fit['a']:.3g} x^-{fit['alpha']:.3f}{tail}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("flow-network parameters" if axis == "params" else "training FLOPs")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs {'parameters' if axis == 'params' else 'compute'}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Analysis:
    runs: list[RunResult]
    skipped: list[tuple[str, str]]
    fits: dict
    out_dir: Path
    files: list[Path]

    def report(self) -> str:
        """The table and the fits, as printed by ``crossflow sweep analyze``."""
        lines = [f"{len(self.runs)} run(s)" + (f", {len(self.skipped)} skipped" if self.skipped else "")]
        lines.append(f"{'run':24s} {'family':20s} {'preset':7s} {'params':>10s} {'FLOPs':>10s} {'steps':>6s} {'loss':>9s}")
        for r in self.runs:
            loss = r.final.get("loss", float("nan"))
            lines.append(f"{r.name:24s} {r.family:20s} {r.preset:7s} {r.params:10.4g} {r.flops:10.4g} "
                         f"{r.steps:6d} {loss:9.5f}")
        for name, why in self.skipped:
            lines.append(f"skipped {name}: {why}")
        for metric, per_family in self.fits.items():
            for family, fits in per_family.items():
                for axis in ("params", "flops"):
                    fit = fits[axis]
                    what = f"{metric} vs {axis} [{family}]"
                    if not fit["form"]:
                        lines.append(f"{what}: no fit ({fit['note']})")
                        continue
                    tail = f" + {fit['c']:.4g}" if fit["form"].endswith("+c") else ""
                    lines.append(f"{what}: {fit['a']:.4g} x^-{fit['alpha']:.4f}{tail}  "
                                 f"(alpha = {fit['alpha']:.4f}, {fit['form']}, rmse_log {fit['rmse_log']:.3g}; {fit['note']})")
        lines.append(f"wrote {', '.join(str(p) for p in self.files)}")
        return "\n".join(lines)


def analyze_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None, metrics=None,
                  skip_bad: bool = False) -> Analysis:
    """Collect, fit, and write runs.csv, curves.csv, fit.json and the PNG plots."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "analysis"
    runs, skipped = collect_runs(sweep_dir, skip_bad)
    metrics = list(metrics or DEFAULT_METRICS)
    for m in metrics:
        if not any(m in r.final for r in runs):
            raise SweepAnalysisError(f"metric {m!r} is in no run's metrics.jsonl; available: "
                                     f"{sorted({k for r in runs for k in r.final})}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fits = fit_sweep(runs, metrics)
    files = [out_dir / "runs.csv", out_dir / "curves.csv", out_dir / "fit.json"]
    write_runs_csv(runs, files[0])
    write_curves_csv(runs, files[1])
    files[2].write_text(json.dumps({
        "sweep": str(sweep_dir), "law": "L(X) = a * X^-alpha + c (form 'a*x^-alpha' when c is not fitted)",
        "x": {"params": "flow-network parameters", "flops": "training FLOPs = flops_per_sample * steps * global batch"},
        "fitted_as_error": [m for m in metrics if m.startswith(HIGHER_IS_BETTER)],
        "fits": fits, "skipped": [{"run": n, "reason": why} for n, why in skipped]}, indent=2))
    for metric in metrics:
        for axis in ("params", "flops"):
            path = out_dir / f"{_slug(metric)}_vs_{axis}.png"
            plot_metric(runs, metric, fits, axis, path)
            files.append(path)
    return Analysis(runs, skipped, fits, out_dir, files)


def log_to_wandb(analysis: Analysis, group: str, project: str = "crossflow", name: str = "sweep-analysis") -> Path:
    """The run table, the fits and the plots as one W&B run in ``group`` (offline unless WANDB_MODE
    says otherwise). Returns the W&B run directory."""
    import wandb
    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(project=project, group=group, name=name, job_type="sweep-analysis",
                     dir=str(analysis.out_dir), mode=mode, reinit=True)
    try:
        with (analysis.out_dir / "runs.csv").open() as f:
            rows = list(csv.reader(f))
        run.log({"runs": wandb.Table(columns=rows[0], data=rows[1:]),
                 **{p.stem: wandb.Image(str(p)) for p in analysis.files if p.suffix == ".png"}})
        for metric, per_family in analysis.fits.items():
            for family, fits in per_family.items():
                for axis in ("params", "flops"):
                    if fits[axis]["form"]:
                        run.summary[f"{metric}/{family}/{axis}/alpha"] = fits[axis]["alpha"]
        return Path(run.dir).parent
    finally:
        run.finish()
