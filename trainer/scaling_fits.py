"""The fits of a scaling study, on plain numbers (numpy/scipy; no runs, no files, no plots).

    fit_power_law        L(X) = a X^-alpha (+ c), X = parameters N or training FLOPs C
    isoflop_minimum      one FLOP budget: loss vs N, a parabola in log N and its minimum
                         (Chinchilla approach 2, Hoffmann et al. 2022), or the measured argmin, flagged
    fit_frontier         N_opt(C) = k C^a over budgets, a straight line in log-log
    bootstrap_frontier   the exponent a's spread: runs resampled within each budget, minima re-found
    compute_envelope     the lowest loss reached with at most C FLOPs by any of a set of curves
"""
from __future__ import annotations

import math

import numpy as np

MIN_POINTS_SATURATING = 4  # a N^-alpha + c has 3 parameters: fit it only when it is over-determined
PUBLISHED_DIT_EXPONENT = 0.568  # N_opt proportional to C^0.568 for DiT (arXiv 2410.08184)
PUBLISHED_DIT_SOURCE = "Scaling laws for diffusion transformers, arXiv 2410.08184: N_opt proportional to C^0.568"


# ----------------------------------------------------------------------------- power laws
def fit_power_law(x, y) -> dict:
    """Fit y = a x^-alpha + c (4+ points) or y = a x^-alpha (2-3 points) in log space.

    Returns {"form", "a", "alpha", "c", "n_points", "rmse_log", "note"}; with fewer than 2 distinct x
    or a non-positive value, {"form": None, "note": why}."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2 or len(np.unique(x)) < 2:
        return {"form": None, "n_points": n, "note": "fewer than 2 distinct x values: nothing to fit"}
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


# ----------------------------------------------------------------------------- isoFLOP minima
def isoflop_minimum(params, losses) -> dict:
    """The loss-minimising size at one FLOP budget, from its runs' (N, loss).

    With 3 or more distinct sizes: L = p2 (log N)^2 + p1 log N + p0 fitted by least squares, N_opt at
    its vertex (Chinchilla approach 2). The measured argmin (lowest mean loss over a size's runs) is
    used instead, and ``found_by`` says so, when there are 2 sizes, when the parabola opens downward,
    or when its vertex lies outside the measured sizes (an optimum past the sweep's edge cannot be
    located from inside it). One size: N_opt is that size, ``found_by`` "one size"."""
    n, loss = np.asarray(params, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    sizes = np.unique(n)
    mean_loss = np.array([loss[n == s].mean() for s in sizes])
    best = int(np.argmin(mean_loss))
    measured = {"n_opt": float(sizes[best]), "l_opt": float(mean_loss[best]), "parabola": None}
    if len(sizes) == 1:
        return {**measured, "found_by": "one size", "note": "one size at this budget: no minimum to find"}
    if len(sizes) == 2:
        return {**measured, "found_by": "measured argmin", "note": "2 sizes: too few for a parabola"}
    p2, p1, p0 = np.polyfit(np.log(n), loss, 2)
    parabola = [float(p2), float(p1), float(p0)]
    if p2 <= 0:
        return {**measured, "parabola": parabola, "found_by": "measured argmin",
                "note": "the parabola in log N opens downward: no minimum"}
    log_opt = -p1 / (2 * p2)
    if not math.log(sizes[0]) <= log_opt <= math.log(sizes[-1]):
        return {**measured, "parabola": parabola, "found_by": "measured argmin",
                "note": f"the parabola's minimum N={math.exp(log_opt):.4g} lies outside the measured sizes "
                        f"[{sizes[0]:.4g}, {sizes[-1]:.4g}]"}
    return {"n_opt": float(math.exp(log_opt)), "l_opt": float(np.polyval([p2, p1, p0], log_opt)),
            "parabola": parabola, "found_by": "parabola", "note": f"{len(sizes)} sizes, minimum inside the range"}


# ----------------------------------------------------------------------------- frontier
def fit_frontier(budgets, n_opts) -> tuple[float, float]:
    """N_opt = k C^a fitted as a line in log-log; returns (k, a)."""
    a, log_k = np.polyfit(np.log(np.asarray(budgets, dtype=np.float64)), np.log(np.asarray(n_opts, dtype=np.float64)), 1)
    return float(math.exp(log_k)), float(a)


def bootstrap_frontier(budget_runs: list[tuple[float, list[float], list[float]]], resamples: int,
                       seed: int = 0, interval: float = 0.9) -> dict:
    """The frontier exponent's spread. ``budget_runs`` = [(budget, sizes, losses)], one entry per
    budget, one size and loss per run. Each resample draws every budget's runs with replacement,
    re-finds each N_opt with ``isoflop_minimum`` and re-fits ``fit_frontier``.

    Returns {"resamples", "seed", "interval", "median", "lo", "hi", "parabola_share", "log_k", "a"}
    ("parabola_share": the share of re-found minima located by a parabola, the rest being measured
    argmins; "log_k"/"a": every resample's fit, for a band on the plot)."""
    rng = np.random.default_rng(seed)
    budgets = [b for b, _, _ in budget_runs]
    exps, log_ks, by_parabola = np.empty(resamples), np.empty(resamples), 0
    for i in range(resamples):
        n_opts = []
        for _, sizes, losses in budget_runs:
            pick = rng.integers(0, len(sizes), len(sizes))
            found = isoflop_minimum(np.asarray(sizes)[pick], np.asarray(losses)[pick])
            by_parabola += found["found_by"] == "parabola"
            n_opts.append(found["n_opt"])
        k, exps[i] = fit_frontier(budgets, n_opts)
        log_ks[i] = math.log(k)
    tail = (1 - interval) / 2 * 100
    return {"resamples": resamples, "seed": seed, "interval": interval, "median": float(np.median(exps)),
            "lo": float(np.percentile(exps, tail)), "hi": float(np.percentile(exps, 100 - tail)),
            "parabola_share": by_parabola / (resamples * len(budget_runs)),
            "log_k": log_ks.tolist(), "a": exps.tolist()}


# ----------------------------------------------------------------------------- compute envelope
def compute_envelope(points_by_size: dict[float, list[tuple[float, float]]], n_grid: int = 16
                     ) -> tuple[np.ndarray, np.ndarray]:
    """The compute-efficient envelope of learning curves (Kaplan et al. 2020): at each C, the lowest
    loss any curve reached with at most C FLOPs. ``points_by_size`` = {size: [(FLOPs spent, loss)]},
    every curve of that size pooled. The envelope is read at ``n_grid`` log-spaced C, so each decade
    weighs the same in a fit however densely the curves were logged, from the C where every size has
    logged a point (below it the minimum would be over some sizes only) to the largest C."""
    start = max(min(c for c, _ in pts) for pts in points_by_size.values())
    c, loss = np.asarray([p for pts in points_by_size.values() for p in pts], dtype=np.float64).T
    order = np.argsort(c, kind="stable")
    c, running_min = c[order], np.minimum.accumulate(loss[order])
    grid = np.geomspace(start, c[-1], n_grid)
    return grid, running_min[np.searchsorted(c, grid * (1 + 1e-9), side="right") - 1]
