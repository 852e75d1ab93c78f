"""The ablation table of a sweep (``crossflow sweep analyze SWEEP_DIR --ablation-table``): runs grouped
by what tells them apart other than their seed, mean +- spread over the seeds, beside the paper's number.

Which runs are one variant: every run directory's ``config.json`` is flattened to dotted keys; the
keys whose values differ between runs, less ``train.seed`` (the repeats) and the keys every run
sets for itself (``train.out_dir``, ``log.wandb_name``), are the variant's; runs equal on all of them
are its seeds. So it reads any sweep, whatever its file said (grid, variants or isoFLOP points).

Per variant and guidance scale: the final ShapesEval (``shapes_eval/overall``, ``overall_heldout``
and each task) and ``val/loss``, mean +- sample standard deviation (ddof 1) over the seeds that
logged them. A run that scored ``eval.cfg_scales`` (``shapes_eval/<task>@cfg<s>``) gives one row
per scale; its plain ``shapes_eval/<task>`` are its ``sample.cfg_scale``. ``val/loss`` does not
depend on guidance: every scale's row shows the run's one value.

The paper column: FID-10K of the paper's 70M ablations (arXiv 2412.15213, Table 3; lower is
better), as our notes on the paper state them, ``n/a`` where they state none. Which ablation a
sweep is follows from its variant keys (``ablation_of``). The paper's FID on 256 px images and
ShapesEval on 32 px shapes are different measures: compare the order of the variants, not the numbers.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

SEED_KEYS = ("train.seed",)
PER_RUN_KEYS = ("train.out_dir", "log.wandb_name")  # a sweep sets them apart for every run
METRICS = (("overall", "shapes_eval/overall"), ("held-out", "shapes_eval/overall_heldout"),
           ("object", "shapes_eval/object"), ("count", "shapes_eval/count"), ("color", "shapes_eval/color"),
           ("position", "shapes_eval/position"), ("size", "shapes_eval/size"), ("val/loss", "val/loss"))
SCALE_MARK = "@cfg"

# FID-10K of the paper's 70M ablations (Table 3), keyed (ablation, variant); only what our notes on
# the paper state. Its CFG row is at the scale its grid search chose (about 2 to 7): one number.
PAPER_FID10K_70M = {
    ("contrastive", "image-text"): 33.41,
    ("contrastive", "text-text"): 34.67,
    ("contrastive", "reconstruction"): 40.78,
    ("cfg", "no guidance"): 33.41,
    ("cfg", "indicator CFG"): 24.33,
    ("two_stage", "joint"): 24.33,
    ("two_stage", "two-stage"): 32.55,
    ("two_stage", "two-stage + joint fine-tuning"): 23.79,
}
PAPER_NOTES = {
    "text_ve": "the paper's notes state no FID-10K for a plain (deterministic) encoder: n/a",
    "contrastive": "the paper's contrastive numbers equal its no-guidance FID (33.41); no number for no contrastive "
                   "term: n/a",
    "cfg": "the paper reports indicator CFG at the scale its grid search chose (24.33, about 2 to 7), not per "
           "scale: every guided row shows that one number; autoguidance (26.36) is not built here",
    "two_stage": "two-stage + joint fine-tuning also converged about 35% faster in the paper",
    "baseline": "the paper compares the families at 0.95B / 1.04B (FID-30K 10.13 vs 10.79, 300K steps), not at "
                "70M: n/a",
}


class AblationTableError(RuntimeError):
    """The sweep directory holds nothing to tabulate; the message says why."""


@dataclass
class Stat:
    mean: float
    std: float  # sample standard deviation over the seeds; nan with one seed
    n: int

    def format(self, digits: int) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class AblationRow:
    ablation: str  # text_ve, contrastive, cfg, two_stage, baseline, or "" when none is recognised
    variant: str  # the ablation's name for it ("image-text", "joint", ...) or the values
    values: dict  # the variant's config keys -> its values
    cfg_scale: float
    runs: list[str]
    stats: dict[str, Stat] = field(default_factory=dict)  # column name (METRICS) -> over the seeds

    @property
    def paper(self) -> str:
        fid = PAPER_FID10K_70M.get((self.ablation, self.variant))
        return "n/a" if fid is None else f"{fid:.2f}"


# ----------------------------------------------------------------------------- reading
def flatten(values: dict, prefix: str = "") -> dict:
    """{"train": {"seed": 1}} -> {"train.seed": 1}."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def read_runs(sweep_dir: Path) -> dict[str, tuple[dict, dict]]:
    """{run name: (flat config, final metrics)} of every run directory holding both files."""
    from trainer.sweep_analysis import final_metrics, read_jsonl
    if not sweep_dir.is_dir():
        raise AblationTableError(f"sweep directory not found: {sweep_dir}")
    runs = {}
    for run_dir in sorted(p for p in sweep_dir.iterdir() if (p / "config.json").is_file()):
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            raise AblationTableError(f"run {run_dir}: metrics.jsonl is missing")
        final = final_metrics(read_jsonl(metrics))
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise AblationTableError(f"{run_dir / 'config.json'}: not valid JSON ({e.msg})") from e
        if not isinstance(config, dict):
            raise AblationTableError(f"{run_dir / 'config.json'}: not a crossflow config (a JSON object)")
        runs[run_dir.name] = (flatten(config), final)
    if not runs:
        raise AblationTableError(f"{sweep_dir}: no run directory (each needs config.json and metrics.jsonl)")
    return runs


def variant_keys(configs: list[dict]) -> list[str]:
    """The config keys whose values differ between the runs, less the seed and the per-run keys."""
    keys = []
    for key in dict.fromkeys(k for c in configs for k in c):
        if key in SEED_KEYS or key in PER_RUN_KEYS:
            continue
        if len({json.dumps(c.get(key), sort_keys=True) for c in configs}) > 1:
            keys.append(key)
    return keys


def scores_by_scale(cfg: dict, final: dict) -> dict[float, dict[str, float]]:
    """{guidance scale: {metric: value}}: ``<metric>@cfg<s>`` at s, the plain metric at sample.cfg_scale
    (unless the run also logged that scale by name); val/loss at every scale."""
    by_scale: dict[float, dict[str, float]] = {}
    for key, value in final.items():
        if key.startswith("shapes_eval/") and SCALE_MARK in key:
            name, scale = key.split(SCALE_MARK)
            by_scale.setdefault(float(scale), {})[name] = value
    default = float(cfg.get("sample.cfg_scale", 1.0))
    plain = {k: v for k, v in final.items() if k.startswith("shapes_eval/") and SCALE_MARK not in k}
    if plain and default not in by_scale:
        by_scale[default] = plain
    if not by_scale:  # no ShapesEval: one row for the validation loss
        by_scale[default] = {}
    for scores in by_scale.values():
        if "val/loss" in final:
            scores["val/loss"] = final["val/loss"]
    return by_scale


# ----------------------------------------------------------------------------- which ablation
def ablation_of(keys: list[str], scales: set[float]) -> str:
    """Which of the paper's ablations a sweep varying ``keys`` (and scoring ``scales``) is."""
    k = set(keys)
    if "model.text_ve" in k:
        return "text_ve"
    if k & {"objective.contrastive", "objective.contrastive_weight"}:
        return "contrastive"
    if k & {"objective.ve_pretrain_steps", "objective.ve_finetune"}:
        return "two_stage"
    if "model.family" in k:
        return "baseline"
    if not k and len(scales) > 1:
        return "cfg"
    return ""


def variant_name(ablation: str, cfg: dict, scale: float) -> str:
    """The paper's name for this run's variant of ``ablation`` (keys of ``PAPER_FID10K_70M``)."""
    if ablation == "text_ve":
        return str(cfg.get("model.text_ve"))
    if ablation == "contrastive":
        if not cfg.get("objective.contrastive_weight"):
            return "none"
        return str(cfg.get("objective.contrastive", "image_text")).replace("_", "-")
    if ablation == "two_stage":
        if not cfg.get("objective.ve_pretrain_steps"):
            return "joint"
        return "two-stage + joint fine-tuning" if cfg.get("objective.ve_finetune") else "two-stage"
    if ablation == "cfg":
        return "no guidance" if scale == 1.0 else "indicator CFG"
    return ""


# ----------------------------------------------------------------------------- the table
def _order(value) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _stat(values: list[float]) -> Stat:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return Stat(math.nan, math.nan, 0)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
    return Stat(mean, std, len(values))


def ablation_rows(runs: dict[str, tuple[dict, dict]]) -> tuple[list[AblationRow], list[str], str]:
    """(one row per variant and guidance scale, the variant keys, the ablation recognised)."""
    names = list(runs)
    keys = variant_keys([runs[n][0] for n in names])
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault(tuple(json.dumps(runs[n][0].get(k)) for k in keys), []).append(n)
    scores = {n: scores_by_scale(*runs[n]) for n in names}
    ablation = ablation_of(keys, {s for n in names for s in scores[n]})
    rows = []
    for members in sorted(groups.values(), key=lambda m: [_order(runs[m[0]][0].get(k)) for k in keys]):
        cfg = runs[members[0]][0]
        values = {k: cfg.get(k) for k in keys}
        for scale in sorted({s for n in members for s in scores[n]}):
            have = [n for n in members if scale in scores[n]]
            stats = {col: _stat([scores[n][scale].get(metric, math.nan) for n in have]) for col, metric in METRICS}
            label = variant_name(ablation, cfg, scale) or ", ".join(f"{k.split('.')[-1]}={v}"
                                                                     for k, v in values.items()) or "all runs"
            rows.append(AblationRow(ablation, label, values, scale, have, stats))
    return rows, keys, ablation


def markdown(rows: list[AblationRow], keys: list[str], ablation: str, title: str) -> str:
    """The table, ready to paste into bench/RESULTS.md: one row per variant and scale, then the notes."""
    head = ["variant", *(k for k in keys), "cfg", "seeds", *(col for col, _ in METRICS), "paper FID-10K (70M)"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.variant, *(str(r.values[k]) for k in keys), f"{r.cfg_scale:g}", str(len(r.runs)),
                 *(r.stats[col].format(4 if col == "val/loss" else 3) for col, _ in METRICS), r.paper]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({len(r.runs) for r in rows})
    lines += ["", f"Mean ± sample standard deviation over {'/'.join(map(str, seeds))} seed(s) (train.seed). "
                  "ShapesEval: fraction of images passing (overall = every task; held-out = overall on the "
                  "color-shape pairs never trained on; higher is better); val/loss: the validation flow-matching "
                  "loss (lower is better). Paper: FID-10K of its 70M ablations (lower is better), a different "
                  "measure on other data: compare the order of the variants, not the numbers."]
    if ablation in PAPER_NOTES:
        lines.append(f"About the paper column: {PAPER_NOTES[ablation]}.")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[AblationRow], keys: list[str], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ablation", "variant", *keys, "cfg_scale", "seeds", "runs",
                    *(f"{col}_{part}" for col, _ in METRICS for part in ("mean", "std", "n")), "paper_fid10k_70m"])
        for r in rows:
            w.writerow([r.ablation, r.variant, *(r.values[k] for k in keys), r.cfg_scale, len(r.runs), " ".join(r.runs),
                        *(x for col, _ in METRICS for x in (r.stats[col].mean, r.stats[col].std, r.stats[col].n)),
                        r.paper])


@dataclass
class AblationTable:
    rows: list[AblationRow]
    keys: list[str]
    ablation: str
    markdown: str
    files: list[Path]


def ablation_table(sweep_dir: str | Path, out_dir: str | Path | None = None) -> AblationTable:
    """Read every run under ``sweep_dir``, group by variant, write ``ablation.md`` and ``ablation.csv``
    to ``out_dir`` (default ``sweep_dir/analysis``)."""
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir / "analysis"
    rows, keys, ablation = ablation_rows(read_runs(sweep_dir))
    title = f"{sweep_dir.resolve().name}" + (f" (the paper's {ablation} ablation)" if ablation else "")
    text = markdown(rows, keys, ablation, title)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "ablation.md", out_dir / "ablation.csv"]
    files[0].write_text(text)
    write_csv(rows, keys, files[1])
    return AblationTable(rows, keys, ablation, text, files)
