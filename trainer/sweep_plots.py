"""The plots of ``crossflow sweep analyze`` (matplotlib, Agg; PNG files), from an ``Analysis``:

    <metric>_vs_params.png, <metric>_vs_flops.png   final values vs N and C, fitted L(N), L(C) per family
    curves_<metric>.png         learning curves, metric vs FLOPs spent, one colour per size
    isoflops_<metric>.png       metric vs N per budget, the parabola in log N, the minimum marked
    frontier_<metric>.png       N_opt vs C (log-log), the fitted k C^a, its bootstrap band, the DiT slope
    extrapolation_<metric>.png  the check: fitted on the smaller sizes, predicted vs measured largest
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

from trainer.scaling_fits import predict
from trainer.sweep_analysis import HIGHER_IS_BETTER, Analysis, RunResult, fitted_value

PARAMS_LABEL = "flow-network parameters N (count)"
FLOPS_LABEL = "training compute C (FLOPs)"


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def slug(metric: str) -> str:
    return metric.replace("/", "_")


def value_label(metric: str) -> str:
    return (f"1 - {metric}" if metric.startswith(HIGHER_IS_BETTER) else metric) + " (dimensionless)"


def size_colors(runs: list[RunResult]) -> dict[int, tuple]:
    """One colour per model size, light to dark as N grows."""
    plt = pyplot()
    sizes = sorted({r.params for r in runs})
    return {n: plt.cm.viridis(0.85 * i / max(len(sizes) - 1, 1)) for i, n in enumerate(sizes)}


def panels(n: int, cols: int = 1, size=(6.0, 4.5)):
    """A figure with ``n`` rows of ``cols`` axes, always returned as a 2-d array."""
    plt = pyplot()
    fig, axes = plt.subplots(n, cols, figsize=(size[0] * cols, size[1] * n), squeeze=False)
    return fig, axes


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def say_why_not(ax, title: str, why: str) -> None:
    ax.set_title(title)
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(f"not possible: {why}", 50)), ha="center", va="center",
            transform=ax.transAxes, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def log_log(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    finish(ax, xlabel, ylabel, title)
    quiet_minor_x_labels(ax)


def quiet_minor_x_labels(ax) -> None:
    """No labels on the minor ticks of a log x axis spanning more than a decade: they overlap, and
    the decades are labelled anyway (short y ranges keep theirs: they may have no decade inside)."""
    from matplotlib.ticker import NullFormatter
    lo, hi = ax.get_xlim()
    if hi / lo > 10 ** 1.2:
        ax.xaxis.set_minor_formatter(NullFormatter())


def finish(ax, xlabel: str, ylabel: str, title: str, legend_outside: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend_outside:  # right of the axes: curves fill the whole panel
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    else:
        ax.legend(fontsize=7)


# ----------------------------------------------------------------------------- the plots
def plot_metric(runs: list[RunResult], metric: str, fits: dict, axis: str, path: Path) -> Path:
    """Log-log final ``metric`` against params or FLOPs: points, fitted curve, one colour per family."""
    fig, axes = panels(1)
    ax = axes[0, 0]
    for i, family in enumerate(sorted({r.family for r in runs})):
        color = f"C{i}"
        rs = [r for r in runs if r.family == family and r.has(metric)]
        if not rs:
            continue
        xs = [r.params if axis == "params" else r.flops for r in rs]
        ys = [fitted_value(metric, r.final[metric]) for r in rs]
        if axis == "flops":  # each run's curve, FLOPs spent so far at each logged step
            for r in rs:
                pts = [(c, v) for c, v in r.curve(metric) if v > 0]
                if pts:
                    ax.plot(*zip(*pts), color=color, alpha=0.25, linewidth=1)
        ax.scatter(xs, [max(v, 1e-12) for v in ys], color=color, zorder=3, label=f"{family}: final values")
        fit = fits.get(metric, {}).get(family, {}).get(axis, {})
        if fit.get("form"):
            grid = np.geomspace(min(xs) / 1.5, max(xs) * 1.5, 100)
            tail = f" + {fit['c']:.3g}" if fit["form"].endswith("+c") else ""
            ax.plot(grid, predict(fit, grid), color=color, linestyle="--",
                    label=f"{family}: {fit['a']:.3g} x^-{fit['alpha']:.3f}{tail}")
    log_log(ax, PARAMS_LABEL if axis == "params" else FLOPS_LABEL, value_label(metric),
            f"{metric} vs {'parameters' if axis == 'params' else 'compute'}")
    return save(fig, path)


def plot_curves_by_size(runs: list[RunResult], metric: str, path: Path) -> Path:
    """Each run's logged ``metric`` against the FLOPs spent, one colour per size, one panel per family."""
    families = sorted({r.family for r in runs if r.has(metric)})
    fig, axes = panels(len(families))
    colors = size_colors(runs)
    for ax, family in zip(axes[:, 0], families):
        labelled = set()
        for r in (r for r in runs if r.family == family and r.has(metric)):
            pts = [(c, v) for c, v in r.curve(metric) if v > 0]
            if not pts:
                continue
            label = None if r.params in labelled else f"N = {r.params:.3g}"
            labelled.add(r.params)
            ax.plot(*zip(*pts), color=colors[r.params], linewidth=1.5, marker=".", markersize=3, label=label)
            ax.scatter([pts[-1][0]], [pts[-1][1]], color=colors[r.params], edgecolor="black", zorder=3, s=30)
        log_log(ax, FLOPS_LABEL, value_label(metric), f"{metric} curves by model size [{family}] (dot: run's end)")
    return save(fig, path)


def plot_isoflops(analysis: Analysis, path: Path) -> Path:
    """Per budget: the runs' metric vs N, the parabola in log N, its minimum (star) or the measured
    argmin used instead (hollow diamond)."""
    fig, axes = panels(len(analysis.isoflops), size=(8.5, 4.5))
    for ax, (family, rows) in zip(axes[:, 0], analysis.isoflops.items()):
        for i, row in enumerate(rows):
            color = f"C{i}"
            ax.scatter(row["sizes"], row["losses"], color=color, zorder=3, label=f"C = {row['budget']:.3g} FLOPs")
            if row["parabola"]:
                grid = np.geomspace(min(row["sizes"]) / 1.2, max(row["sizes"]) * 1.2, 100)
                ax.plot(grid, np.polyval(row["parabola"], np.log(grid)), color=color, linestyle="--", linewidth=1)
            if row["found_by"] == "parabola":
                ax.scatter([row["n_opt"]], [row["l_opt"]], marker="*", s=220, color=color, edgecolor="black",
                           zorder=4, label=f"  N_opt = {row['n_opt']:.3g} (parabola)")
            else:
                ax.scatter([row["n_opt"]], [row["l_opt"]], marker="D", s=110, facecolor="none", edgecolor=color,
                           linewidth=2, zorder=4, label=f"  N_opt = {row['n_opt']:.3g} ({row['found_by']})")
        ax.set_xscale("log")
        finish(ax, PARAMS_LABEL, value_label(analysis.metric),
               f"isoFLOP curves [{family}]: dashed = parabola in log N", legend_outside=True)
        quiet_minor_x_labels(ax)
    return save(fig, path)


def plot_frontier(analysis: Analysis, path: Path) -> Path:
    """N_opt vs budget per family (hollow: a measured argmin), k C^a with the bootstrap's 90% band,
    and the published DiT slope drawn through the middle of our points."""
    fig, axes = panels(1)
    ax = axes[0, 0]
    notes = []
    for i, (family, rows) in enumerate(analysis.isoflops.items()):
        color, f = f"C{i}", analysis.frontiers[family]
        by_parabola = [row for row in rows if row["found_by"] == "parabola"]
        flagged = [row for row in rows if row["found_by"] != "parabola"]
        if by_parabola:
            ax.scatter([r["budget"] for r in by_parabola], [r["n_opt"] for r in by_parabola], color=color, zorder=3,
                       label=f"{family}: N_opt (parabola)")
        if flagged:
            ax.scatter([r["budget"] for r in flagged], [r["n_opt"] for r in flagged], facecolor="none",
                       edgecolor=color, linewidth=2, zorder=3, label=f"{family}: N_opt (measured argmin)")
        if f["a"] is None:
            notes.append(f"{family}: {f['note']}")
            continue
        budgets = np.asarray(f["budgets"])
        grid = np.geomspace(budgets.min() / 2, budgets.max() * 2, 100)
        ax.plot(grid, f["k"] * grid ** f["a"], color=color,
                label=f"{family}: {f['k']:.3g} C^{f['a']:.3f}")
        fits = np.exp(np.asarray(f["bootstrap_fits"]["log_k"])[:, None]
                      + np.asarray(f["bootstrap_fits"]["a"])[:, None] * np.log(grid)[None, :])  # (resamples, grid)
        b = f["bootstrap"]
        tail = (1 - b["interval"]) / 2 * 100
        ax.fill_between(grid, np.percentile(fits, tail, axis=0), np.percentile(fits, 100 - tail, axis=0), color=color,
                        alpha=0.2, label=f"  bootstrap {b['interval']:.0%}: a in [{b['lo']:.3f}, {b['hi']:.3f}]")
        c_mid, n_mid = np.exp(np.log(budgets).mean()), np.exp(np.log(f["n_opt"]).mean())
        ref = f["reference"]["a"]
        ax.plot(grid, n_mid * (grid / c_mid) ** ref, color="grey", linestyle=":",
                label=f"DiT reference slope C^{ref} (arXiv 2410.08184)" if i == 0 else None)
    if notes:
        ax.text(0.02, 0.02, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom")
    log_log(ax, "FLOP budget C (FLOPs)", "compute-optimal size N_opt (parameters)",
            f"compute-optimal frontier ({analysis.metric})")
    return save(fig, path)


def plot_extrapolation(analysis: Analysis, path: Path) -> Path:
    """Per family: L(N) (left) and L(C) envelope (right) fitted on every size but the largest, the
    fit extended to the largest size, its predicted (x) and measured (square) values."""
    metric = analysis.metric
    fig, axes = panels(len(analysis.extrapolation), cols=2)
    colors = size_colors(analysis.runs)
    for row_axes, (family, checks) in zip(axes, analysis.extrapolation.items()):
        plot_params_check(row_axes[0], family, checks["params"], metric)
        plot_flops_check(row_axes[1], family, checks["flops"], analysis.runs, colors, metric)
    return save(fig, path)


def plot_params_check(ax, family: str, check: dict, metric: str) -> None:
    title = f"L(N) extrapolation [{family}]"
    if not check["checks"]:
        say_why_not(ax, title, check["why_not"])
        return
    for i, c in enumerate(check["checks"]):
        color, preds = f"C{i}", c["predictions"]
        ax.scatter(c["fit_sizes"], c["fit_losses"], color=color, zorder=3, label=f"{c['samples']} samples: fitted on")
        grid = np.geomspace(min(c["fit_sizes"]) / 1.3, max(p["params"] for p in preds) * 1.3, 100)
        ax.plot(grid, predict(c["fit"], grid), color=color, linestyle="--", label="  fit, extended")
        mark_predictions(ax, preds, "params", color)
    log_log(ax, PARAMS_LABEL, value_label(metric), title)


def plot_flops_check(ax, family: str, check: dict, runs: list[RunResult], colors: dict, metric: str) -> None:
    title = f"L(C) envelope extrapolation [{family}]"
    if check["why_not"]:
        say_why_not(ax, title, check["why_not"])
        return
    by_name = {r.name: r for r in runs}
    for name in check["fit_runs"] + [p["run"] for p in check["predictions"]]:
        r = by_name[name]
        pts = [(c, v) for c, v in r.curve(metric) if v > 0]
        if pts:
            ax.plot(*zip(*pts), color=colors[r.params], alpha=0.5, linewidth=1,
                    label="learning curves (colour: size)" if name == check["fit_runs"][0] else None)
    env = check["envelope"]
    ax.scatter(env["flops"], env["loss"], color="grey", s=14, zorder=3, label="envelope of the smaller sizes (fitted)")
    grid = np.geomspace(min(env["flops"]), max(p["flops"] for p in check["predictions"]) * 1.5, 100)
    ax.plot(grid, predict(check["fit"], grid), color="black", linestyle="--", label="L(C) fit, extended")
    mark_predictions(ax, check["predictions"], "flops", "C3")
    log_log(ax, FLOPS_LABEL, value_label(metric), title)


def mark_predictions(ax, preds: list[dict], axis: str, color) -> None:
    for j, p in enumerate(preds):
        ax.scatter([p[axis]], [p["measured"]], marker="s", s=60, color=color, edgecolor="black", zorder=5,
                   label="largest size: measured" if j == 0 else None)
        ax.scatter([p[axis]], [p["predicted"]], marker="x", s=90, color="red", linewidth=2.5, zorder=6,
                   label=f"predicted (error {p['rel_error']:+.1%})")


def plot_all(analysis: Analysis, metrics: list[str]) -> list[Path]:
    """Every plot of the analysis into its out_dir; returns the files."""
    out, m, files = analysis.out_dir, slug(analysis.metric), []
    for metric in metrics:
        for axis in ("params", "flops"):
            files.append(plot_metric(analysis.runs, metric, analysis.fits, axis, out / f"{slug(metric)}_vs_{axis}.png"))
    files.append(plot_curves_by_size(analysis.runs, analysis.metric, out / f"curves_{m}.png"))
    if analysis.isoflops:
        files += [plot_isoflops(analysis, out / f"isoflops_{m}.png"), plot_frontier(analysis, out / f"frontier_{m}.png")]
    if analysis.extrapolation:
        files.append(plot_extrapolation(analysis, out / f"extrapolation_{m}.png"))
    return files
