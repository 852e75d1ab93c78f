"""A sweep file and its points: what ``crossflow sweep`` runs, without Ray (``cluster/sweep.py`` runs it).

A sweep file (``configs/sweeps/*.yaml``)::

    name: isoflop_tiny                # also the W&B group of every run
    base_config: configs/demo.yaml    # the training config every run starts from
    out_dir: runs/sweeps/isoflop_tiny # one run directory per point below it
    overrides: [train.global_batch_size=16]   # applied to every run
    isoflop:                          # FLOP budgets x model sizes (Chinchilla's approach 2)
      budgets: [1e11, 3e11]           # training FLOPs per run: train.target_flops, which sets its steps
      sizes:                          # keys -> values, zipped: one model size per index
        model.hidden_size: [64, 128, 192]
        model.depth: [2, 3, 4]
      # (or a list of presets: sizes: [70M, 150M, 300M], short for {model.preset: [...]})
    grid:                             # and/or the cartesian product of these values
      model.family: [crossflow, cross_attention_fm]
    variants:                         # and/or named combinations, one point each (x the rest): what a
      - {objective.contrastive: image_text}       # product cannot say, e.g. an ablation's "none" point
      - {objective.contrastive_weight: 0}
    resources: {cpus: 1, gpus: 0}     # per worker: cluster.cpus_per_worker / gpus_per_worker (default: the config's)
    max_concurrent: 2                 # at most this many runs at once (0: as many as the cluster holds)
    gpu_memory_gib: 80                # optional: size each point with `crossflow plan` for this GPU memory
    min_workers_per_point: 1          # the sizing's first world size (more GPUs per point: shorter runs)
    max_workers_per_point: 8          # the most workers such a point may get
    trial_retries: 0                  # Tune runs a failed point again this many times (cluster/sweep.py)

Points are budgets x sizes x variants x grid (any part may be absent, not all); an isoFLOP point is
named for its budget and size, e.g. ``flops-2e12_hidden_size-64_depth-2``, a variant for its values
(``contrastive_weight-0_seed-1``), and an isoFLOP point trains
``train.target_flops=<budget>``: its steps are ``trainer.plan.steps_for_target_flops`` (written
into its overrides as ``train.steps``, so its config is what the run records).

Workers, micro-batch and accumulation of a point: the config's ``cluster.num_workers`` and
``train.grad_accum``; or, with ``gpu_memory_gib``, the smallest world size min_workers_per_point x
2^k up to ``max_workers_per_point`` at which ``crossflow plan`` finds a micro-batch that fits that
memory and divides the global batch (its ``best_micro_batch`` x ``best_grad_accum``), written into
the point's overrides: fewest GPUs per point, so more points train at once and less of each step
is communication (``min_workers_per_point`` trades that for shorter runs). ``resources`` are per
worker and become ``cluster.cpus_per_worker`` / ``cluster.gpus_per_worker``; a point's
``workers``, ``cpus_per_worker`` and ``gpus_per_worker`` are its config's.

``expand(spec)`` gives one ``SweepPoint`` per run, each config validated (and its steps, workers
and micro-batch checked) before anything starts; errors name the sweep key or the point.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from trainer.config import Config, ConfigError, load_config, per_rank_batch_size, read_yaml_mapping

# The sweep's resource keys and the per-worker config keys they set.
RESOURCE_KEYS = {"cpus": "cluster.cpus_per_worker", "gpus": "cluster.gpus_per_worker"}


@dataclass
class IsoFlop:
    """FLOP budgets x model sizes: ``sizes`` maps config keys to equally long lists (zipped)."""
    budgets: list[float]
    sizes: dict[str, list]

    @property
    def num_sizes(self) -> int:
        return len(next(iter(self.sizes.values())))

    def size(self, i: int) -> dict:
        return {k: v[i] for k, v in self.sizes.items()}


@dataclass
class SweepSpec:
    name: str
    base_config: str
    out_dir: str
    grid: dict[str, list] = field(default_factory=dict)
    isoflop: IsoFlop | None = None
    variants: list[dict] = field(default_factory=list)  # each {config key: value}: one point (x grid x isoflop)
    overrides: list[str] = field(default_factory=list)
    resources: dict = field(default_factory=dict)  # per worker: {cpus, gpus}; empty = the config's cluster keys
    max_concurrent: int = 0  # 0 = as many as the cluster fits
    gpu_memory_gib: float = 0.0  # > 0: workers, micro-batch, accumulation per point from `crossflow plan`
    max_workers_per_point: int = 8
    min_workers_per_point: int = 1  # the sizing starts here (more GPUs per point: shorter runs)
    trial_retries: int = 0  # Tune runs a failed point again (resuming its checkpoint) this many times


@dataclass
class SweepPoint:
    """One run of the sweep: its name (also its run directory's), the overrides that make its
    config from ``base_config``, that config (validated, steps derived from a FLOP budget), and
    the sweep values that single it out (``axes``: key -> value, the budget as train.target_flops)."""
    name: str
    overrides: list[str]
    cfg: Config
    axes: dict = field(default_factory=dict)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)

    @property
    def budget(self) -> float:
        """Training FLOPs of the run (train.target_flops); 0 when its steps are train.steps."""
        return self.cfg.train.target_flops

    @property
    def steps(self) -> int:
        return self.cfg.train.steps

    @property
    def workers(self) -> int:
        """Ray Train workers (DeepSpeed ranks) of the run."""
        return self.cfg.cluster.num_workers

    @property
    def cpus_per_worker(self) -> float:
        return self.cfg.cluster.cpus_per_worker

    @property
    def gpus_per_worker(self) -> float:
        return self.cfg.cluster.gpus_per_worker

    @property
    def grad_accum(self) -> int:
        return self.cfg.train.grad_accum

    @property
    def micro_batch(self) -> int:
        return per_rank_batch_size(self.cfg.train.global_batch_size, self.workers, self.grad_accum)


# ----------------------------------------------------------------------------- the file
def load_sweep(path: str | Path) -> SweepSpec:
    """Read and check a sweep file; errors name the file and the key."""
    path = Path(path)
    raw = read_yaml_mapping(path, "sweep file", "sweep keys")
    known = set(SweepSpec.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; valid: {sorted(known)}")
    missing = {"name", "base_config", "out_dir"} - set(raw)
    if missing:
        raise ConfigError(f"{path}: missing sweep keys {sorted(missing)}")
    if not raw.get("grid") and not raw.get("isoflop") and not raw.get("variants"):
        raise ConfigError(f"{path}: give the points: a grid (config key -> values), an isoflop section "
                          f"(budgets x sizes), variants (a list of config key -> value), or several")
    grid = _check_axes(raw.get("grid") or {}, f"{path}: grid")
    variants = _check_variants(raw.get("variants") or [], grid, f"{path}: variants")
    isoflop = _load_isoflop(raw["isoflop"], path) if raw.get("isoflop") else None
    if isoflop is not None:
        swept = set(grid) | {k for v in variants for k in v}
        shared = (swept & set(isoflop.sizes)) | (swept & {"train.target_flops", "train.steps"})
        if shared:
            raise ConfigError(f"{path}: grid or variant key(s) {sorted(shared)} conflict with isoflop (its sizes set the "
                              f"model keys, its budgets set train.target_flops and so train.steps)")
    resources = raw.get("resources") or {}
    if not isinstance(resources, dict) or set(resources) - set(RESOURCE_KEYS):
        raise ConfigError(f"{path}: resources must map {sorted(RESOURCE_KEYS)} to numbers (per worker), "
                          f"got {resources!r}")
    for key, least, kind in (("gpu_memory_gib", 0, (int, float)), ("max_concurrent", 0, int),
                             ("max_workers_per_point", 1, int), ("min_workers_per_point", 1, int),
                             ("trial_retries", 0, int)):
        value = raw.get(key, least)
        if not isinstance(value, kind) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{path}: {key} must be a number >= {least}, got {value!r}")
    if raw.get("min_workers_per_point", 1) > raw.get("max_workers_per_point", 8):
        raise ConfigError(f"{path}: min_workers_per_point={raw['min_workers_per_point']} exceeds "
                          f"max_workers_per_point={raw.get('max_workers_per_point', 8)}")
    return SweepSpec(**{**raw, "grid": grid, "isoflop": isoflop, "variants": variants, "resources": resources})


def _check_axes(axes, where: str) -> dict[str, list]:
    if not isinstance(axes, dict):
        raise ConfigError(f"{where} must map config keys to non-empty lists of values, got {axes!r}")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
    return dict(axes)


def _check_variants(variants, grid: dict, where: str) -> list[dict]:
    """A list of non-empty mappings of config keys to single values, none repeated, none on a grid key."""
    if not isinstance(variants, list):
        raise ConfigError(f"{where} must be a list of mappings (config key -> one value), got {variants!r}")
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or not v or any(isinstance(x, (list, dict)) for x in v.values()):
            raise ConfigError(f"{where}[{i}] must map config keys to single values, got {v!r}")
        if set(v) & set(grid):
            raise ConfigError(f"{where}[{i}] sets grid key(s) {sorted(set(v) & set(grid))}: give each key in one place")
    names = [point_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where} repeats a variant: {names}")
    return [dict(v) for v in variants]


def _load_isoflop(raw, path: Path) -> IsoFlop:
    where = f"{path}: isoflop"
    if not isinstance(raw, dict) or set(raw) != {"budgets", "sizes"}:
        raise ConfigError(f"{where} must have exactly the keys budgets (FLOPs per run) and sizes (model keys -> "
                          f"values, or a list of presets), got {raw!r}")
    budgets = raw["budgets"]
    if not isinstance(budgets, list) or not budgets:
        raise ConfigError(f"{where}.budgets must be a non-empty list of FLOP counts, got {budgets!r}")
    parsed = []
    for i, b in enumerate(budgets):
        try:  # YAML 1.1 reads 2e12 (no dot) as a string
            value = float(b) if not isinstance(b, bool) else -1.0
        except (TypeError, ValueError):
            value = -1.0
        if not value > 0:
            raise ConfigError(f"{where}.budgets[{i}] must be a positive FLOP count, got {b!r}")
        parsed.append(value)
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"{where}.budgets has repeated values: {budgets}")
    sizes = raw["sizes"]
    if isinstance(sizes, list):
        sizes = {"model.preset": sizes}
    sizes = _check_axes(sizes, f"{where}.sizes")
    if not sizes:
        raise ConfigError(f"{where}.sizes must name at least one model key (or be a list of presets)")
    lengths = {k: len(v) for k, v in sizes.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(f"{where}.sizes are zipped (one model size per index), so their lists must be equally "
                          f"long: {lengths}")
    return IsoFlop(parsed, sizes)


# ----------------------------------------------------------------------------- the points
def _slug(key: str, value) -> str:
    return f"{key.split('.')[-1]}-{value}".replace("/", "_").replace(" ", "")


def _axes(spec: SweepSpec) -> list[dict]:
    """Every point's sweep values, in order: budgets, then sizes, then the variant, then the grid."""
    grid_keys = list(spec.grid)
    grid = [dict(zip(grid_keys, values)) for values in itertools.product(*(spec.grid[k] for k in grid_keys))]
    grid = [{**v, **g} for v in (spec.variants or [{}]) for g in grid]
    if spec.isoflop is None:
        return grid
    iso = spec.isoflop
    return [{"train.target_flops": budget, **iso.size(i), **g}
            for budget in iso.budgets for i in range(iso.num_sizes) for g in grid]


def point_name(axes: dict) -> str:
    from trainer.plan import format_flops
    return "_".join(f"flops-{format_flops(v)}" if k == "train.target_flops" else _slug(k, v)
                    for k, v in axes.items())


def expand(spec: SweepSpec) -> list[SweepPoint]:
    """Every point of the sweep; every run's config is validated here, before anything starts: its
    keys, its steps (from a FLOP budget), and its workers x micro-batch x accumulation (sized by
    ``crossflow plan`` when the sweep gives ``gpu_memory_gib``). Errors name the point."""
    points = []
    for axes in _axes(spec):
        name = point_name(axes)
        try:
            points.append(_point(spec, name, axes))
        except ConfigError as e:
            raise ConfigError(f"sweep {spec.name}, point {name}: {e}") from e
        except ValueError as e:  # a model the values cannot build (e.g. a width not a multiple of head_dim)
            raise ConfigError(f"sweep {spec.name}, point {name}: cannot build its model: {e}") from e
    return points


def _point(spec: SweepSpec, name: str, axes: dict) -> SweepPoint:
    from trainer.plan import build_meta_model, format_flops, steps_for_target_flops
    out_dir = Path(spec.out_dir) / name
    resources = [f"{RESOURCE_KEYS[k]}={v}" for k, v in spec.resources.items()]
    exact = lambda v: format_flops(v) if float(format_flops(v)) == v else repr(v)  # noqa: E731  (2e12 if exact)
    values = [f"{k}={exact(v) if k == 'train.target_flops' else v}" for k, v in axes.items()]
    run = [f"train.out_dir={out_dir}", f"log.wandb_group={spec.name}", f"log.wandb_name={name}",
           "train.resume=auto", "log.progress=false"]
    overrides = [*resources, *spec.overrides, *values]
    cfg = load_config(spec.base_config, overrides)  # fails naming the key
    if spec.gpu_memory_gib:  # (a model the values cannot build fails here, or just below)
        plan = size_for_gpu(cfg, spec.gpu_memory_gib, spec.max_workers_per_point, spec.min_workers_per_point)
        overrides += [f"cluster.num_workers={plan.world_size}", f"train.grad_accum={plan.best_grad_accum}"]
        per_sample = plan.flops_per_sample
    else:
        per_sample = build_meta_model(cfg).flops_per_sample()
    if cfg.train.target_flops > 0:
        overrides.append(f"train.steps={steps_for_target_flops(cfg, per_sample)}")  # the error names the budget
    overrides += run
    cfg = load_config(spec.base_config, overrides)
    per_rank_batch_size(cfg.train.global_batch_size, cfg.cluster.num_workers, cfg.train.grad_accum)  # or fail
    return SweepPoint(name, overrides, cfg, axes)


# ----------------------------------------------------------------------------- sizing
def with_world(cfg: Config, workers: int, grad_accum: int | None = None) -> Config:
    """A copy of ``cfg`` on ``workers`` workers (and ``grad_accum``, when given)."""
    train = cfg.train if grad_accum is None else dataclasses.replace(cfg.train, grad_accum=grad_accum)
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, num_workers=workers), train=train)


def size_for_gpu(cfg: Config, gpu_memory_gib: float, max_workers: int, min_workers: int = 1):
    """The plan (``trainer.plan.Plan``) of ``cfg`` at the smallest world size min_workers x 2^k, up to
    ``max_workers``, at which ``crossflow plan`` finds a micro-batch that fits GPUs of
    ``gpu_memory_gib`` and divides the global batch: ``plan.world_size`` workers, the largest such
    micro-batch ``plan.best_micro_batch`` x ``plan.best_grad_accum``. ConfigError with the largest
    world's numbers when none fits."""
    from trainer.plan import Hardware, make_plan
    hw = Hardware(gpu_memory_gb=gpu_memory_gib)
    workers = min_workers
    while True:
        plan = make_plan(with_world(cfg, workers, 1), hw)
        if plan.best_micro_batch:
            return plan
        if 2 * workers > max_workers:
            break
        workers *= 2
    m = plan.memory_gib
    state = m["weights"] + m["gradients"] + m["optimizer"] + m["ema"]
    per_sample = plan.activation_gib_per_sample["with_ac" if plan.activation_checkpointing else "without_ac"]
    raise ConfigError(f"no world size up to max_workers_per_point={max_workers} fits gpu_memory_gib="
                      f"{gpu_memory_gib:g}: at {plan.world_size} workers the plan needs {state:.2f} GiB of model "
                      f"state per GPU + {per_sample * 1024:.1f} MiB of activations per sample (largest micro-batch "
                      f"{plan.max_micro_batch}, global batch {plan.global_batch_size}); raise max_workers_per_point "
                      f"or train.zero_stage, or set train.activation_checkpointing=true")



# ----------------------------------------------------------------------------- crossflow sweep plan
def plan_rows(spec: SweepSpec, points: list[SweepPoint]) -> list[dict]:
    """One row per point: what it trains, for how long, on how many workers, the plan's memory per
    GPU (for GPUs of the sweep's ``gpu_memory_gib``, else 80 GiB; CPU points are not checked) and its
    GPU hours (``crossflow plan``'s step time: H100 peak at 45% MFU, 400 Gbit/s per GPU)."""
    from trainer.plan import Hardware, format_flops, make_plan
    hw = Hardware(gpu_memory_gb=spec.gpu_memory_gib or 80.0)
    rows = []
    for p in points:
        plan = make_plan(p.cfg, hw)
        gpu = p.gpus_per_worker > 0
        # the plan's step time (compute at its MFU, or communication when that is slower) x steps x GPUs
        gpu_hours = p.steps * max(plan.compute_s_per_step, plan.comm_s_per_step) * p.workers / 3600
        params = f"{plan.flow_params / 1e9:.3g}B" if plan.flow_params >= 1e9 else f"{plan.flow_params / 1e6:.3g}M"
        rows.append({"point": p.name, "family": plan.family, "params": params,
                     "FLOPs/sample": format_flops(float(f"{plan.flops_per_sample:.3g}")),
                     "budget": format_flops(p.budget) if p.budget else "-", "steps": p.steps,
                     "batch": p.cfg.train.global_batch_size, "workers": p.workers, "micro": p.micro_batch,
                     "accum": p.grad_accum, "GiB/GPU": f"{plan.total_gib:.1f}",
                     "fits": ("yes" if plan.fits else "NO") if gpu else "cpu",
                     "GPU hours": f"{gpu_hours:.3g}" if gpu else "-",
                     "training FLOPs": plan.training_flops})
    return rows


def format_sweep_plan(spec: SweepSpec, rows: list[dict]) -> str:
    from trainer.plan import format_flops
    columns = [c for c in rows[0] if c != "training FLOPs"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    line = lambda values: "  ".join(str(v).ljust(width[c]) for c, v in zip(columns, values)).rstrip()  # noqa: E731
    gib = f"{spec.gpu_memory_gib:g} GiB GPUs" if spec.gpu_memory_gib else "80 GiB GPUs (no gpu_memory_gib given)"
    out = [f"sweep {spec.name}: {len(rows)} points from {spec.base_config}; memory per GPU for {gib}", "",
           line(columns), *(line([r[c] for c in columns]) for r in rows), "",
           f"training FLOPs, all points: {format_flops(sum(r['training FLOPs'] for r in rows))}; workers, all "
           f"points at once: {sum(r['workers'] for r in rows)} (max_concurrent: "
           f"{spec.max_concurrent or 'as the cluster holds'})"]
    hours = [float(r["GPU hours"]) for r in rows if r["GPU hours"] != "-"]
    if hours:
        out.append(f"GPU hours, all points: {sum(hours):.4g} at the plan's 45% MFU of an H100 (bench/RESULTS.md "
                   f"measured 27.7% for the 0.95B)")
    return "\n".join(out)
