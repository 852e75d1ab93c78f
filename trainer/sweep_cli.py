"""``crossflow sweep ...``: scaling-law sweeps. ``analyze`` is here (pure, no Ray); the Ray runner
adds ``sweep run`` to the parser that ``add_sweep_commands`` returns."""
from __future__ import annotations

import argparse


def _analyze(args: argparse.Namespace) -> int:
    from trainer.sweep_analysis import SweepAnalysisError, analyze_sweep, log_to_wandb
    if args.ablation_table:
        return _ablation_table(args)
    try:
        analysis = analyze_sweep(args.sweep_dir, args.out, args.metric or None, args.skip_bad, args.bootstrap)
    except SweepAnalysisError as e:
        print(f"crossflow sweep analyze: {e}")
        return 1
    print(analysis.report())
    if args.wandb:
        from pathlib import Path
        group = args.group or analysis.wandb_group or Path(args.sweep_dir).resolve().name
        print(f"W&B run (group {group}): {log_to_wandb(analysis, group, args.project)}")
    return 0


def _ablation_table(args: argparse.Namespace) -> int:
    from trainer.ablation_table import AblationTableError, ablation_table
    from trainer.sweep_analysis import SweepAnalysisError
    try:
        table = ablation_table(args.sweep_dir, args.out)
    except (AblationTableError, SweepAnalysisError) as e:
        print(f"crossflow sweep analyze: {e}")
        return 1
    print(table.markdown)
    print(f"wrote {', '.join(str(p) for p in table.files)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from trainer.sweep_spec import expand, format_sweep_plan, load_sweep, plan_rows
    spec = load_sweep(args.config)
    print(format_sweep_plan(spec, plan_rows(spec, expand(spec))))  # a bad file or point: ConfigError
    return 0


def add_sweep_commands(subparsers: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register ``sweep analyze`` on the main parser's subparsers; returns the ``sweep`` parser's
    subparsers, so other commands (``sweep run``) join the same parser. Each leaf sets ``func``."""
    sweep = subparsers.add_parser("sweep", help="scaling-law sweeps: plan a sweep, run it on Ray, analyze its runs",
                                  description="Sweeps over model sizes (and steps, batch, LR). "
                                              "`crossflow sweep --config FILE` is short for `crossflow sweep run "
                                              "--config FILE`.")
    sub = sweep.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("analyze", help="tables, scaling fits, isoFLOP minima, frontier, extrapolation check, plots",
                       description="Read every run directory under SWEEP_DIR (config.json, metrics.jsonl), "
                                   "compute each model's parameters N and training FLOPs C, and fit, on val/loss "
                                   "when every run logged it (else the training loss): L(N) = a N^-alpha + c and "
                                   "L(C) per model family (a pure power law with fewer than 4 runs); per FLOP "
                                   "budget (train.target_flops) loss vs N with a parabola in log N and its "
                                   "minimum N_opt; the frontier N_opt = k C^a with a bootstrap interval on a; "
                                   "and the extrapolation check (fit on every size but the largest, predict the "
                                   "largest). Writes runs.csv, curves.csv, isoflops.csv, extrapolation.csv, "
                                   "fit.json and PNG plots.")
    p.add_argument("sweep_dir", help="directory holding one run directory per run")
    p.add_argument("--out", default=None, help="output directory (default: SWEEP_DIR/analysis)")
    p.add_argument("--metric", action="append", default=[],
                   help="metric to fit and plot, repeatable; the first drives the isoFLOP, frontier and "
                        "extrapolation analyses (default: val/loss when every run logged it, else loss; e.g. "
                        "shapes_eval/overall, fitted as 1 - score)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples for the frontier exponent's 90%% interval (seed 0)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip run directories with a missing or corrupt config/metrics file and list them "
                        "(default: stop with an error naming the file)")
    p.add_argument("--wandb", action="store_true", help="also log the tables, fits and plots to W&B "
                                                        "(offline unless WANDB_MODE says otherwise)")
    p.add_argument("--group", default=None, help="W&B group (default: the runs' log.wandb_group when they share one, else the "
                                           "sweep directory's name)")
    p.add_argument("--project", default="crossflow", help="W&B project")
    p.add_argument("--ablation-table", action="store_true",
                   help="instead of the scaling fits: group the runs by what tells them apart besides train.seed "
                        "and print mean ± std over the seeds of ShapesEval (overall, held-out, per task; a row per "
                        "eval.cfg_scales scale) and val/loss beside the paper's FID-10K; writes ablation.md and "
                        "ablation.csv to --out")
    p.set_defaults(func=_analyze)

    p = sub.add_parser("plan", help="a sweep's points before it runs: steps, workers, micro-batch, memory",
                       description="Expand a sweep file (no Ray, nothing trained) and print one row per point: "
                                   "name, model family, flow-network parameters, training FLOPs per sample, FLOP "
                                   "budget (isoflop points) and the steps it buys, global batch, workers, "
                                   "micro-batch and gradient accumulation (sized by `crossflow plan` when the "
                                   "sweep gives gpu_memory_gib), the plan's memory per GPU, whether it fits and "
                                   "its GPU hours at the plan's 45% MFU (GPU points). Every point's config is "
                                   "validated; errors name the point.")
    p.add_argument("--config", required=True, help="sweep file (configs/sweeps/<name>.yaml)")
    p.set_defaults(func=_plan)
    return sub
