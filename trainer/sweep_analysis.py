"""Scaling-law analysis of a sweep: one run directory per run (each written by ``trainer.loop.train``)
-> tables, fitted laws, an extrapolation check and plots. Pure: no Ray, no training, no GPU.

Per run it reads ``config.json`` (the resolved config) and ``metrics.jsonl``, and derives the model's
size and cost by building it on the meta device from the config:
    N = flow-network parameters (``flow_params()``, as the paper counts model size)
    C = training FLOPs = flops_per_sample() * samples seen (steps x global batch)
    budget = ``train.target_flops`` (> 0 for the runs of an isoFLOP sweep)

The metric: ``val/loss`` (the fixed validation set's loss: no sampling noise) when every run logged
it, else the training ``loss``; ``metrics=`` (``--metric``) chooses, the first one driving the
isoFLOP, frontier and extrapolation analyses. Metrics where higher is better (ShapesEval, CLIP score)
are fitted as an error, 1 - score.

What it fits (the numbers: ``trainer/scaling_fits.py``), per model family:
  - L(N) and L(C) over the runs' final values: a X^-alpha + c with 4+ runs, a X^-alpha with 2-3.
  - isoFLOP curves: per budget, loss vs N; with 3+ sizes a parabola in log N and its minimum
    (N_opt, L_opt; Chinchilla approach 2); the measured argmin, flagged, with 2 sizes or a minimum
    outside the measured sizes.
  - the compute-optimal frontier N_opt(C) = k C^a over the budgets (2+), the exponent's 90% interval
    by bootstrap (runs resampled within each budget, 1000 times, seed 0), next to the published DiT
    exponent (arXiv 2410.08184: 0.568).
  - the extrapolation check, "fit on every size but the largest, predict the largest":
      L(N): runs of equal length (no budget, same samples seen) with 3+ sizes: L(N) fitted on the
            smaller sizes' final values, the largest size's final value predicted.
      L(C): every family with 2+ sizes: the compute envelope (the lowest loss reached with at most C
            FLOPs, Kaplan et al. 2020) of the smaller sizes' logged curves after warm-up, read at 16
            log-spaced C from where every size has a point, fitted with L(C) = a C^-alpha (+ c), predicts each largest-size run's final value at its compute. The
            envelope is the loss of the best size for C, so this predicts a compute-optimal model:
            a largest model that is too big for its budget measures above the prediction, and the
            error says by how much. It works with 2 sizes (the envelope of one size's curves).
    A check that cannot be made says why, in the report and in fit.json.

Outputs, in ``<sweep>/analysis`` by default: ``runs.csv`` (one row per run, final values),
``curves.csv`` (every logged record with its FLOPs so far), ``isoflops.csv``, ``extrapolation.csv``,
``fit.json`` (everything), and the plots (``trainer/sweep_plots.py``).

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

from trainer.scaling_fits import (PUBLISHED_DIT_EXPONENT, PUBLISHED_DIT_SOURCE, bootstrap_frontier, compute_envelope,
                                  fit_frontier, fit_power_law, isoflop_minimum, predict)

HIGHER_IS_BETTER = ("shapes_eval/", "clip")  # metric-name prefixes fitted as 1 - score
VAL_METRIC, TRAIN_METRIC = "val/loss", "loss"
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 1000, 0


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
    target_flops: float = 0.0  # train.target_flops: the run's FLOP budget (0 = not an isoFLOP run)
    warmup_steps: int = 0
    wandb_group: str = ""  # log.wandb_group: a sweep puts its runs in one group

    @property
    def samples(self) -> int:
        return self.steps * self.global_batch

    @property
    def flops(self) -> float:
        return self.flops_per_sample * self.samples

    def has(self, metric: str) -> bool:
        """Whether the run's final ``metric`` can be fitted: logged, and finite (a diverged run's NaN is not)."""
        return math.isfinite(self.final.get(metric, math.nan))

    def final_flops(self, metric: str) -> float:
        """FLOPs spent by the step of the last record logging ``metric`` (the run's end, unless it
        was stopped between that record and its last training step)."""
        step = max((rec["step"] for rec in self.records if metric in rec), default=self.steps)
        return step * self.global_batch * self.flops_per_sample

    def curve(self, metric: str, after_warmup: bool = False) -> list[tuple[float, float]]:
        """(FLOPs spent by the step, value) of every record logging ``metric`` after step 0; with
        ``after_warmup``, only past the LR warm-up (at most the run's first half: the law
        describes training at the full LR)."""
        first = min(self.warmup_steps, self.steps // 2) if after_warmup else 0
        return [(rec["step"] * self.global_batch * self.flops_per_sample, fitted_value(metric, rec[metric]))
                for rec in self.records if metric in rec and rec["step"] > first and math.isfinite(rec[metric])]


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


def final_metrics(records: list[dict]) -> dict[str, float]:
    """Each numeric metric's last logged value (later records win; ``step`` and flags left out)."""
    final: dict[str, float] = {}
    for r in records:
        final.update({k: float(v) for k, v in r.items()
                      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
    return final


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
                              cfg.objective.contrastive_init_temperature, cfg.objective.contrastive)
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
        raw = json.loads(config_path.read_text())
        if not isinstance(raw, dict):
            raise ConfigError(f"a JSON {type(raw).__name__}, not an object")
        cfg = config_from_dict(raw)
    except (json.JSONDecodeError, ConfigError) as e:
        raise SweepAnalysisError(f"{config_path}: not a valid crossflow config ({e})") from e
    records = read_jsonl(metrics_path)
    if not any("loss" in r for r in records):
        raise SweepAnalysisError(f"{metrics_path}: no training record (no 'loss' in any line)")
    for i, r in enumerate(records, start=1):
        if not isinstance(r.get("step"), int):
            raise SweepAnalysisError(f"{metrics_path}: record {i} has no integer 'step'")
    final = final_metrics(records)
    steps = max(r["step"] for r in records if "loss" in r)
    try:
        model = model_on_meta(cfg)
    except (FileNotFoundError, ValueError) as e:  # e.g. the text encoder's folder, whose width sizes the model
        raise SweepAnalysisError(f"{config_path}: cannot build the run's model to count its parameters and "
                                 f"FLOPs ({e})") from e
    return RunResult(name=run_dir.name, family=cfg.model.family, preset=cfg.model.preset,
                     params=int(model.flow_params()), flops_per_sample=float(model.flops_per_sample()),
                     steps=steps, global_batch=cfg.train.global_batch_size, final=final, records=records,
                     target_flops=cfg.train.target_flops, warmup_steps=cfg.optim.warmup_steps,
                     wandb_group=cfg.log.wandb_group)


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
    runs.sort(key=lambda r: (r.family, r.params, r.target_flops, r.name))
    return runs, skipped


# ----------------------------------------------------------------------------- the metric
def fitted_value(metric: str, value: float) -> float:
    """What is fitted for ``metric``: the value itself, or 1 - score where higher is better."""
    return 1.0 - value if metric.startswith(HIGHER_IS_BETTER) else value


def choose_metrics(runs: list[RunResult], requested) -> tuple[list[str], str]:
    """(metrics, why): the requested ones (each must be in some run), else ``val/loss`` when every
    run logged it, else the training ``loss``. The first drives isoFLOPs, frontier and extrapolation."""
    if requested:
        for m in requested:
            if not any(m in r.final for r in runs):
                raise SweepAnalysisError(f"metric {m!r} is in no run's metrics.jsonl; available: "
                                         f"{sorted({k for r in runs for k in r.final})}")
        return list(requested), "chosen with --metric"
    without_val = [r.name for r in runs if VAL_METRIC not in r.final]
    if not without_val:
        return [VAL_METRIC], "every run logged the validation loss"
    return [TRAIN_METRIC], (f"the training loss: {len(without_val)} of {len(runs)} run(s) logged no {VAL_METRIC} "
                            f"(e.g. {without_val[0]}); fits on it carry the batches' sampling noise")


# ----------------------------------------------------------------------------- L(N), L(C)
def fit_sweep(runs: list[RunResult], metrics) -> dict:
    """{metric: {family: {"params": fit, "flops": fit}}} over the runs that logged the metric."""
    out: dict = {}
    for metric in metrics:
        per_family: dict = {}
        for family in families_of(runs):
            rs = [r for r in runs if r.family == family and r.has(metric)]
            if not rs:
                continue
            y = [fitted_value(metric, r.final[metric]) for r in rs]
            per_family[family] = {"params": fit_power_law([r.params for r in rs], y),
                                  "flops": fit_power_law([r.flops for r in rs], y),
                                  "runs": [r.name for r in rs]}
        if per_family:
            out[metric] = per_family
    return out


def families_of(runs: list[RunResult]) -> list[str]:
    return sorted({r.family for r in runs})


# ----------------------------------------------------------------------------- isoFLOPs and frontier
def isoflop_runs(runs: list[RunResult], metric: str, family: str) -> dict[float, list[RunResult]]:
    """{budget: runs} of the family's isoFLOP runs (train.target_flops > 0) that logged ``metric``."""
    by_budget: dict[float, list[RunResult]] = {}
    for r in runs:
        if r.family == family and r.target_flops > 0 and r.has(metric):
            by_budget.setdefault(r.target_flops, []).append(r)
    return dict(sorted(by_budget.items()))


def isoflop_table(runs: list[RunResult], metric: str) -> dict[str, list[dict]]:
    """{family: one row per budget: runs, sizes, losses and the minimum ``isoflop_minimum`` found}."""
    table = {}
    for family in families_of(runs):
        rows = []
        for budget, rs in isoflop_runs(runs, metric, family).items():
            rs = sorted(rs, key=lambda r: r.params)
            losses = [fitted_value(metric, r.final[metric]) for r in rs]
            rows.append({"budget": budget, "runs": [r.name for r in rs], "sizes": [r.params for r in rs],
                         "losses": losses, **isoflop_minimum([r.params for r in rs], losses)})
        if rows:
            table[family] = rows
    return table


def frontier(rows: list[dict], resamples: int) -> dict:
    """N_opt(C) = k C^a over the budgets with 2+ sizes, and the bootstrap of a; or why not."""
    usable = [row for row in rows if row["found_by"] != "one size"]
    left_out = [row["budget"] for row in rows if row["found_by"] == "one size"]
    out = {"reference": {"a": PUBLISHED_DIT_EXPONENT, "source": PUBLISHED_DIT_SOURCE},
           "budgets_left_out": left_out}
    if len(usable) < 2:
        return {**out, "a": None, "note": f"{len(usable)} budget(s) with 2+ sizes: the frontier needs 2 or more"}
    budgets, n_opts = [row["budget"] for row in usable], [row["n_opt"] for row in usable]
    k, a = fit_frontier(budgets, n_opts)
    flagged = [f"{row['budget']:.3g}" for row in usable if row["found_by"] != "parabola"]
    boot = bootstrap_frontier([(row["budget"], row["sizes"], row["losses"]) for row in usable], resamples,
                              BOOTSTRAP_SEED)
    every_fit = {"log_k": boot.pop("log_k"), "a": boot.pop("a")}  # for the plot's band, not for fit.json
    note = f"{len(usable)} budgets" + (f"; N_opt is a measured argmin at budget(s) {', '.join(flagged)}" if flagged
                                       else "; every N_opt from a parabola")
    if len(flagged) == len(usable):
        note += " (every N_opt is a measured size, so a only says which size won at each budget)"
    return {**out, "k": k, "a": a, "budgets": budgets, "n_opt": n_opts,
            "found_by": [row["found_by"] for row in usable], "bootstrap": boot, "bootstrap_fits": every_fit,
            "note": note}


# ----------------------------------------------------------------------------- extrapolation check
def extrapolate_params(runs: list[RunResult], metric: str, family: str) -> dict:
    """L(N) fitted on the smaller sizes' final values, the largest size's predicted, per group of
    equally long runs (no FLOP budget, same samples seen) with 3+ sizes."""
    rs = [r for r in runs if r.family == family and r.has(metric)]
    if rs and all(r.target_flops > 0 for r in rs):
        return {"checks": [], "why_not": "isoFLOP runs only: at a fixed budget loss vs N is U-shaped, not a power "
                                         "law, so there is no L(N) to extrapolate (see the L(C) check)"}
    groups: dict[int, list[RunResult]] = {}
    for r in rs:
        if r.target_flops == 0:
            groups.setdefault(r.samples, []).append(r)
    checks, reasons = [], []
    for samples, group in sorted(groups.items()):
        sizes = sorted({r.params for r in group})
        if len(sizes) < 3:
            reasons.append(f"{samples} samples: {len(sizes)} size(s), L(N) needs 3 (fit on 2+, predict the largest)")
            continue
        fit_set = [r for r in group if r.params < sizes[-1]]
        fit = fit_power_law([r.params for r in fit_set], [fitted_value(metric, r.final[metric]) for r in fit_set])
        if not fit["form"]:
            reasons.append(f"{samples} samples: no fit ({fit['note']})")
            continue
        targets = [r for r in group if r.params == sizes[-1]]
        checks.append({"samples": samples, "fit": fit, "fit_runs": [r.name for r in fit_set],
                       "fit_sizes": [r.params for r in fit_set],
                       "fit_losses": [fitted_value(metric, r.final[metric]) for r in fit_set],
                       "predictions": [prediction(r, r.params, float(predict(fit, r.params)), metric)
                                       for r in targets]})
    return {"checks": checks, "why_not": "; ".join(reasons) if not checks else ""}


def extrapolate_flops(runs: list[RunResult], metric: str, family: str) -> dict:
    """L(C) fitted on the compute envelope of the smaller sizes' curves, each largest-size run's
    final value predicted at its compute (see the module docstring for what it predicts)."""
    rs = [r for r in runs if r.family == family and r.has(metric)]
    sizes = sorted({r.params for r in rs})
    if len(sizes) < 2:
        return {"why_not": f"{len(sizes)} size: the check needs 2 or more (fit on the smaller, predict the largest)"}
    fit_set = [r for r in rs if r.params < sizes[-1]]
    by_size: dict[int, list[tuple[float, float]]] = {}
    for r in fit_set:
        by_size.setdefault(r.params, []).extend(r.curve(metric, after_warmup=True))
    points = [p for pts in by_size.values() for p in pts]
    if len({c for c, _ in points}) < 2 or not all(by_size.values()):
        return {"why_not": f"the smaller sizes logged {len(points)} {metric} point(s) after warm-up: too few "
                           "for L(C), or a size none (log more often: train.log_every / eval.val_every)"}
    grid, envelope = compute_envelope(by_size)
    if grid[0] >= grid[-1]:
        return {"why_not": f"the smaller sizes' {metric} curves share no range of compute (each size's first point "
                           "after warm-up lies at or past every other's last): no envelope to fit"}
    fit = fit_power_law(grid, envelope)
    if not fit["form"]:
        return {"why_not": f"no L(C) fit on the envelope ({fit['note']})"}
    c_max = max(c for c, _ in points)
    targets = [r for r in rs if r.params == sizes[-1]]
    return {"fit": fit, "fit_runs": [r.name for r in fit_set], "envelope": {"flops": grid.tolist(),
                                                                             "loss": envelope.tolist()},
            "fit_flops_max": c_max,
            "predictions": [prediction(r, r.final_flops(metric), float(predict(fit, r.final_flops(metric))), metric)
                            for r in targets],
            "why_not": ""}


def prediction(run: RunResult, x: float, predicted: float, metric: str) -> dict:
    """The largest-size run's final value of ``metric``, predicted at ``x`` (its N or its C), and measured."""
    measured = fitted_value(metric, run.final[metric])
    return {"run": run.name, "params": run.params, "flops": run.final_flops(metric), "x": x, "predicted": predicted,
            "measured": measured, "rel_error": (predicted - measured) / measured if measured else math.nan}


def extrapolation(runs: list[RunResult], metric: str) -> dict:
    return {family: {"params": extrapolate_params(runs, metric, family),
                     "flops": extrapolate_flops(runs, metric, family)}
            for family in families_of(runs) if any(r.has(metric) for r in runs if r.family == family)}


# ----------------------------------------------------------------------------- tables
def write_runs_csv(runs: list[RunResult], path: Path) -> list[str]:
    """One row per run; returns the metric columns (every metric any run logged, sorted)."""
    metric_cols = sorted({k for r in runs for k in r.final})
    head = ["run", "family", "preset", "params", "flops_per_sample", "target_flops", "steps", "global_batch",
            "samples", "flops"]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head + [f"final_{m}" for m in metric_cols] + ["first_loss"])
        for r in runs:
            first = next(rec["loss"] for rec in r.records if "loss" in rec)
            w.writerow([r.name, r.family, r.preset, r.params, f"{r.flops_per_sample:.6g}", f"{r.target_flops:.6g}",
                        r.steps, r.global_batch, r.samples, f"{r.flops:.6g}"]
                       + [r.final.get(m, "") for m in metric_cols] + [first])
    return metric_cols


def write_curves_csv(runs: list[RunResult], path: Path) -> None:
    """Every logged record (training and evaluation) with the samples and FLOPs spent by its step."""
    keys = sorted({k for r in runs for rec in r.records for k in rec if k != "step"})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "family", "params", "target_flops", "step", "samples", "flops"] + keys)
        for r in runs:
            for rec in r.records:
                s = rec["step"] * r.global_batch
                w.writerow([r.name, r.family, r.params, f"{r.target_flops:.6g}", rec["step"], s,
                            f"{s * r.flops_per_sample:.6g}"] + [rec.get(k, "") for k in keys])


ISOFLOP_COLUMNS = ["family", "budget", "sizes", "losses", "n_opt", "l_opt", "found_by", "note"]
EXTRAPOLATION_COLUMNS = ["family", "check", "run", "params", "flops", "predicted", "measured", "rel_error"]


def isoflop_rows(isoflops: dict) -> list[list]:
    return [[family, f"{row['budget']:.4g}", " ".join(str(n) for n in row["sizes"]),
             " ".join(f"{v:.5g}" for v in row["losses"]), f"{row['n_opt']:.5g}", f"{row['l_opt']:.5g}",
             row["found_by"], row["note"]] for family, rows in isoflops.items() for row in rows]


def extrapolation_rows(extrap: dict) -> list[list]:
    rows = []
    for family, checks in extrap.items():
        found = [("L(N)", p) for c in checks["params"]["checks"] for p in c["predictions"]]
        found += [("L(C)", p) for p in checks["flops"].get("predictions", [])]
        rows += [[family, check, p["run"], p["params"], f"{p['flops']:.5g}", f"{p['predicted']:.5g}",
                  f"{p['measured']:.5g}", f"{p['rel_error']:+.4f}"] for check, p in found]
    return rows


def write_table(path: Path, columns: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)


# ----------------------------------------------------------------------------- the analysis
@dataclass
class Analysis:
    runs: list[RunResult]
    skipped: list[tuple[str, str]]
    metric: str  # the one isoFLOPs, frontier and extrapolation use
    metric_why: str
    fits: dict  # L(N), L(C): {metric: {family: {"params", "flops"}}}
    isoflops: dict  # {family: [row per budget]}
    frontiers: dict  # {family: frontier}
    extrapolation: dict  # {family: {"params", "flops"}}
    out_dir: Path
    files: list[Path]

    @property
    def wandb_group(self) -> str:
        """The W&B group every run was logged in (``log.wandb_group``), or "" when they differ or none is set."""
        groups = {r.wandb_group for r in self.runs}
        return groups.pop() if len(groups) == 1 else ""

    def report(self) -> str:
        """The tables and the fits, as printed by ``crossflow sweep analyze``."""
        m = self.metric
        lines = [f"{len(self.runs)} run(s)" + (f", {len(self.skipped)} skipped" if self.skipped else ""),
                 f"metric: {m} ({self.metric_why})",
                 f"{'run':28s} {'family':20s} {'params':>10s} {'budget':>9s} {'FLOPs':>10s} {'steps':>6s} {m:>10s}"]
        for r in self.runs:
            budget = f"{r.target_flops:9.3g}" if r.target_flops else f"{'-':>9s}"
            lines.append(f"{r.name:28s} {r.family:20s} {r.params:10.4g} {budget} {r.flops:10.4g} {r.steps:6d} "
                         f"{r.final.get(m, float('nan')):10.5f}")
        lines += [f"skipped {name}: {why}" for name, why in self.skipped]
        unfit = [r.name for r in self.runs if m in r.final and not r.has(m)]
        if unfit:
            lines.append(f"left out of every fit: {', '.join(unfit)} (final {m} not finite)")
        lines += self._fit_lines() + self._isoflop_lines() + self._frontier_lines() + self._extrapolation_lines()
        lines.append(f"wrote {', '.join(str(p) for p in self.files)}")
        return "\n".join(lines)

    def _fit_lines(self) -> list[str]:
        lines = []
        for metric, per_family in self.fits.items():
            for family, fits in per_family.items():
                for axis in ("params", "flops"):
                    fit, what = fits[axis], f"{metric} vs {axis} [{family}]"
                    lines.append(f"{what}: no fit ({fit['note']})" if not fit["form"] else
                                 f"{what}: {law(fit)}  (alpha = {fit['alpha']:.4f}, {fit['form']}, "
                                 f"rmse_log {fit['rmse_log']:.3g}; {fit['note']})")
        return lines

    def _isoflop_lines(self) -> list[str]:
        if not self.isoflops:
            return ["isoFLOP curves: none (no run has train.target_flops > 0)"]
        lines = [f"isoFLOP curves ({self.metric} vs N per budget):",
                 f"  {'family':20s} {'budget':>9s} {'sizes':>5s} {'N_opt':>10s} {'L_opt':>9s}  found by"]
        for family, rows in self.isoflops.items():
            for row in rows:
                lines.append(f"  {family:20s} {row['budget']:9.3g} {len(set(row['sizes'])):5d} {row['n_opt']:10.4g} "
                             f"{row['l_opt']:9.5f}  {row['found_by']}: {row['note']}")
                lines.append("      " + ", ".join(f"N={n:.4g}: {v:.5f}" for n, v in zip(row["sizes"], row["losses"])))
        return lines

    def _frontier_lines(self) -> list[str]:
        lines = []
        for family, f in self.frontiers.items():
            ref = f"published DiT exponent {f['reference']['a']} ({f['reference']['source']})"
            if f["a"] is None:
                lines.append(f"frontier N_opt(C) [{family}]: not fitted ({f['note']}); {ref}")
                continue
            b = f["bootstrap"]
            lines.append(f"frontier N_opt(C) [{family}]: {f['k']:.4g} C^{f['a']:.4f}; bootstrap ({b['resamples']} "
                         f"resamples, seed {b['seed']}): median {b['median']:.4f}, {b['interval']:.0%} interval "
                         f"[{b['lo']:.4f}, {b['hi']:.4f}], {b['parabola_share']:.0%} of re-found minima by parabola; "
                         f"{f['note']}")
            lines.append(f"  for reference: {ref}")
        return lines

    def _extrapolation_lines(self) -> list[str]:
        lines = [f"extrapolation check ({self.metric}: fit on every size but the largest, predict the largest):"]
        for family, checks in self.extrapolation.items():
            p = checks["params"]
            for c in p["checks"]:
                lines.append(f"  L(N) [{family}], {c['samples']} samples: {law(c['fit'])} on {len(c['fit_runs'])} run(s)")
                lines += [prediction_line(pred) for pred in c["predictions"]]
            if p["why_not"]:
                lines.append(f"  L(N) [{family}]: not possible: {p['why_not']}")
            f = checks["flops"]
            if f["why_not"]:
                lines.append(f"  L(C) [{family}]: not possible: {f['why_not']}")
                continue
            lines.append(f"  L(C) [{family}], envelope of {len(f['fit_runs'])} smaller run(s)' curves up to "
                         f"{f['fit_flops_max']:.4g} FLOPs: {law(f['fit'])}")
            lines += [prediction_line(pred) for pred in f["predictions"]]
        return lines


def law(fit: dict) -> str:
    tail = f" + {fit['c']:.4g}" if fit["form"].endswith("+c") else ""
    return f"{fit['a']:.4g} x^-{fit['alpha']:.4f}{tail}"


def prediction_line(p: dict) -> str:
    return (f"    {p['run']}: N={p['params']:.4g}, C={p['flops']:.4g}: predicted {p['predicted']:.5f}, "
            f"measured {p['measured']:.5f}, error {p['rel_error']:+.2%}")


def analyze_sweep(sweep_dir: str | Path, out_dir: str | Path | None = None, metrics=None,
                  skip_bad: bool = False, bootstrap_resamples: int = BOOTSTRAP_RESAMPLES) -> Analysis:
    """Collect, fit, and write the tables, fit.json and the PNG plots."""
    from trainer import sweep_plots
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "analysis"
    if bootstrap_resamples < 1:
        raise SweepAnalysisError(f"bootstrap resamples must be >= 1, got {bootstrap_resamples}")
    runs, skipped = collect_runs(sweep_dir, skip_bad)
    metrics, why = choose_metrics(runs, metrics)
    metric = metrics[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    fits = fit_sweep(runs, metrics)
    isoflops = isoflop_table(runs, metric)
    frontiers = {family: frontier(rows, bootstrap_resamples) for family, rows in isoflops.items()}
    extrap = extrapolation(runs, metric)
    files = [out_dir / name for name in ("runs.csv", "curves.csv", "isoflops.csv", "extrapolation.csv", "fit.json")]
    write_runs_csv(runs, files[0])
    write_curves_csv(runs, files[1])
    write_table(files[2], ISOFLOP_COLUMNS, isoflop_rows(isoflops))
    write_table(files[3], EXTRAPOLATION_COLUMNS, extrapolation_rows(extrap))
    files[4].write_text(json.dumps({
        "sweep": str(sweep_dir), "metric": metric, "metric_why": why,
        "law": "L(X) = a * X^-alpha + c (form 'a*x^-alpha' when c is not fitted)",
        "x": {"params": "flow-network parameters", "flops": "training FLOPs = flops_per_sample * steps * global batch",
              "budget": "train.target_flops"},
        "fitted_as_error": [m for m in metrics if m.startswith(HIGHER_IS_BETTER)],
        "fits": fits, "isoflops": isoflops,
        "frontier": {family: {k: v for k, v in f.items() if k != "bootstrap_fits"} for family, f in frontiers.items()}, "extrapolation": extrap,
        "skipped": [{"run": n, "reason": w} for n, w in skipped]}, indent=2))
    analysis = Analysis(runs, skipped, metric, why, fits, isoflops, frontiers, extrap, out_dir, files)
    analysis.files += sweep_plots.plot_all(analysis, metrics)
    return analysis


def log_to_wandb(analysis: Analysis, group: str, project: str = "crossflow", name: str = "sweep-analysis") -> Path:
    """The tables (runs, isoFLOP minima, extrapolation) as wandb.Tables, the plots as images and the
    exponents and prediction errors in the summary, as one W&B run in ``group`` (offline unless
    WANDB_MODE says otherwise). Returns the W&B run directory."""
    import wandb
    mode = os.environ.get("WANDB_MODE", "offline")
    run = wandb.init(project=project, group=group, name=name, job_type="sweep-analysis",
                     dir=str(analysis.out_dir), mode=mode, reinit=True)
    try:
        with (analysis.out_dir / "runs.csv").open() as f:
            rows = list(csv.reader(f))
        run.log({"runs": wandb.Table(columns=rows[0], data=rows[1:]),
                 "isoflops": wandb.Table(columns=ISOFLOP_COLUMNS, data=isoflop_rows(analysis.isoflops)),
                 "extrapolation": wandb.Table(columns=EXTRAPOLATION_COLUMNS,
                                              data=extrapolation_rows(analysis.extrapolation)),
                 **{p.stem: wandb.Image(str(p)) for p in analysis.files if p.suffix == ".png"}})
        run.summary.update(summary_numbers(analysis))
        return Path(run.dir).parent
    finally:
        run.finish()


def summary_numbers(analysis: Analysis) -> dict[str, float | str]:
    """The headline numbers: the metric, L(N)/L(C) exponents, frontier exponent and interval, errors."""
    out: dict[str, float | str] = {"metric": analysis.metric}
    for metric, per_family in analysis.fits.items():
        for family, fits in per_family.items():
            out.update({f"{metric}/{family}/{axis}/alpha": fits[axis]["alpha"]
                        for axis in ("params", "flops") if fits[axis]["form"]})
    for family, f in analysis.frontiers.items():
        if f["a"] is not None:
            out.update({f"frontier/{family}/a": f["a"], f"frontier/{family}/a_median": f["bootstrap"]["median"],
                        f"frontier/{family}/a_lo": f["bootstrap"]["lo"], f"frontier/{family}/a_hi": f["bootstrap"]["hi"]})
        out["frontier/reference_a"] = f["reference"]["a"]
    for family, checks in analysis.extrapolation.items():
        for c in checks["params"]["checks"]:
            out.update({f"extrapolation/{family}/L(N)/{p['run']}/rel_error": p["rel_error"] for p in c["predictions"]})
        out.update({f"extrapolation/{family}/L(C)/{p['run']}/rel_error": p["rel_error"]
                    for p in checks["flops"].get("predictions", [])})
    return out
