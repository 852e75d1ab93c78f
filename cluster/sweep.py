"""``crossflow sweep run``: every point of a sweep file one distributed Ray Train run, driven by Ray Tune.

The sweep file and its points are ``trainer/sweep_spec.py``'s (``load_sweep``, ``expand``). As Ray
Train V2 documents sweeps of distributed runs, a ``ray.tune.Tuner`` runs one trial per point; the
trial (``run_point``: an actor reserving ``TRIAL_MEMORY`` and no CPU; the Train workers reserve
theirs) builds the point's TorchTrainer with ``cluster.ray_train.build_trainer`` (its ``cluster.num_workers``
DeepSpeed workers, its own FailureConfig from ``cluster.max_failures``, its checkpoints and
storage), adds Tune's ``TuneReportCallback`` and fits it. Tune gives:

- **concurrency**: ``max_concurrent_trials`` is the sweep's ``max_concurrent`` or, when 0, as many
  points as the cluster holds with the largest point's workers x resources, so no Train run waits
  for workers another trial holds. Without ``--address``/RAY_ADDRESS an embedded cluster sized for
  that many points starts (``max_concurrent``, else as many as this machine's CPUs hold).
- **retries**: a failed trial (its Train run out of worker restarts, or its actor lost) runs again
  up to ``trial_retries`` times (sweep file), its Train run resuming from its latest checkpoint.
  Default 0: the Train run already restarts its workers ``cluster.max_failures`` times, and a
  trial retry would repeat a deterministic error (a bad config, a NaN) as many times again; a run
  lost with its trial's node is run again by ``--retry-failed``.
- **resuming**: the experiment is ``<out_dir>/tune`` (``<cluster.storage_path>/<name>/tune`` when
  the config sets a shared storage). The same command again ``Tuner.restore``s it: finished points
  do not run again; unfinished ones start again and their Train run resumes from its own latest
  checkpoint (``train.resume=auto``, same run name and storage); ``--retry-failed`` runs the failed
  ones again too. Tune saves its state at every turn of its loop (``TUNE_GLOBAL_CHECKPOINT_S=0``;
  its default is every 10 s or more), and a point is reported finished only after that, so a driver
  killed once a point finished does not run it again. A trial whose point's ``summary.json`` says
  it is complete (the state lost in the instant before it reached the disk) returns at once.
- **one table**: Tune's ResultGrid, as ``<out_dir>/results.csv`` (point, status, steps, loss,
  val/loss, error) and printed.

The console: one line per trial start, finish, failure and retry (Tune's own tables are off), the
workers' checkpoint lines. Every point's W&B run is in the sweep's group (``log.wandb_group``).
Ctrl-C stops the sweep (Tune's handler: trials and their workers end, the state is saved); the
same command resumes it. Not yet measured: a sweep across several nodes (the Tune state then
needs a ``cluster.storage_path`` every node reaches). This replaces our own scheduler of single-process Ray tasks (a ray.wait
loop, ``sweep_state.json``, a retry flag of ours).
"""
from __future__ import annotations

import csv
import json
import os
import posixpath
from pathlib import Path

import ray
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from cluster.ray_train import RunControl, build_trainer, join_or_start, prepare_driver
from trainer.config import Config, ConfigError, config_from_dict
from trainer.metrics import read_metrics
from trainer.sweep_spec import SweepPoint, SweepSpec, expand

TUNE_DIR = "tune"  # the Tune experiment, under the sweep's out_dir
RESULTS_FILE = "results.csv"
TRIAL_MEMORY = 64 * 2**20  # what a trial's actor reserves: memory, no CPU (its Train workers hold those; Tune
                           # wants some resource), so a cluster exactly as large as k points' workers runs k
COLUMNS = ["point", "status", "steps", "loss", "val/loss", "error"]


# ----------------------------------------------------------------------------- the trial
def finished_metrics(cfg: Config) -> dict | None:
    """The final metrics of a point whose run completed (``summary.json`` at its planned steps, not
    stopped early), from its ``metrics.jsonl``; None when it has not."""
    out_dir = Path(cfg.train.out_dir)
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if summary.get("steps") != cfg.train.steps or summary.get("stopped"):
        return None
    metrics = {"step": summary["steps"]}
    for record in read_metrics(out_dir / "metrics.jsonl") if (out_dir / "metrics.jsonl").is_file() else []:
        metrics.update({k: v for k, v in record.items() if k in ("loss", "val/loss")})
    return metrics


def run_point(config: dict, points: dict[str, dict]) -> None:
    """A Tune trial: the Ray Train run of the point ``config["point"]`` (``points``: name -> config
    dict). Its workers report to Tune through ``TuneReportCallback``; it fails when the run does."""
    if config["point"] not in points:
        raise ConfigError(f"point {config['point']} of this sweep's Tune experiment is no longer in the sweep file; "
                          f"give the sweep a new out_dir, or remove its tune/ folder to start over (finished runs "
                          f"are kept and not run again)")
    cfg = config_from_dict(points[config["point"]])
    done = finished_metrics(cfg)
    if done is not None:  # finished before the driver died, in the instant before Tune saved it
        ray.tune.report(done)
        return
    build_trainer(cfg, RunControl.remote(), callbacks=[TuneReportCallback()]).fit()


# ----------------------------------------------------------------------------- resources
def point_demand(cfg: Config) -> dict[str, float]:
    """What one point's trial holds while it runs: its workers' resources and the trial's memory."""
    c = cfg.cluster
    return {"CPU": c.num_workers * c.cpus_per_worker, "GPU": c.num_workers * c.gpus_per_worker,
            "memory": c.num_workers * c.memory_per_worker_gb * 2**30 + TRIAL_MEMORY}


def largest_demand(points: list[SweepPoint]) -> dict[str, float]:
    """Per resource, the most any point needs: a cluster holding k of these holds any k points."""
    demands = [point_demand(p.cfg) for p in points]
    return {r: max(d[r] for d in demands) for r in demands[0]}


def points_that_fit(demand: dict[str, float], available: dict[str, float]) -> int:
    """How many points of ``demand`` the cluster's ``available`` resources hold at once."""
    return min(int(available.get(r, 0) // need) for r, need in demand.items() if need > 0)


def concurrency(spec: SweepSpec, points: list[SweepPoint], available: dict[str, float]) -> int:
    """``max_concurrent_trials``: the sweep's ``max_concurrent`` (0: no limit of its own), no more
    than the cluster holds, no more than the points; at least 1 (a cluster that holds none of them
    may be waiting for its autoscaler: said once)."""
    fit = points_that_fit(largest_demand(points), available)
    if fit == 0:
        print(f"sweep {spec.name}: the cluster ({available}) holds no point of this sweep at once "
              f"({largest_demand(points)} each); the trials wait for resources", flush=True)
    return max(1, min(fit, spec.max_concurrent or len(points), len(points)))


def local_cluster_size(spec: SweepSpec, points: list[SweepPoint]) -> tuple[float, float]:
    """(CPUs, GPUs) of an embedded cluster for this sweep: ``max_concurrent`` points at once, or as
    many as this machine's CPUs hold (at least one, even when one point alone asks for more)."""
    demand = largest_demand(points)
    fit = max(1, int((os.cpu_count() or 1) // demand["CPU"])) if demand["CPU"] else len(points)
    trials = min(spec.max_concurrent or fit, len(points))
    return trials * demand["CPU"], trials * demand["GPU"]


def connect(spec: SweepSpec, points: list[SweepPoint], address: str) -> bool:
    """Join ``address``, or start an embedded cluster sized for the sweep. True when this process
    started the cluster (and shuts it down)."""
    return join_or_start(address, lambda: local_cluster_size(spec, points))


# ----------------------------------------------------------------------------- the Tuner
def tune_experiment_path(spec: SweepSpec, points: list[SweepPoint]) -> str:
    """Where Tune keeps the sweep's state: ``<out_dir>/tune``, or ``<cluster.storage_path>/<name>/tune``
    when the points set a storage every node reaches (a trial may run on any node)."""
    storage = points[0].cfg.cluster.storage_path
    root = f"{storage.rstrip('/')}/{spec.name}" if storage else str(Path(spec.out_dir).resolve())
    return f"{root}/{TUNE_DIR}"


def trial_name(trial) -> str:
    return trial.config["point"]


def make_tuner(spec: SweepSpec, points: list[SweepPoint], retry_failed: bool, max_concurrent: int):
    """A new Tuner over the points, or the sweep's earlier experiment restored. Returns (tuner, restored)."""
    path = tune_experiment_path(spec, points)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_point, points={p.name: p.cfg.to_dict() for p in points}),
        {"cpu": 0, "memory": TRIAL_MEMORY})
    if ray.tune.Tuner.can_restore(path):
        return ray.tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True,
                                      resume_errored=retry_failed), True
    root, name = path.rsplit("/", 1)
    tuner = ray.tune.Tuner(
        trainable, param_space={"point": ray.tune.grid_search([p.name for p in points])},
        tune_config=ray.tune.TuneConfig(max_concurrent_trials=max_concurrent, trial_name_creator=trial_name,
                                        trial_dirname_creator=trial_name),
        run_config=ray.tune.RunConfig(name=name, storage_path=root, verbose=0, callbacks=[TrialLines(spec.name)],
                                      failure_config=ray.tune.FailureConfig(max_failures=spec.trial_retries)))
    return tuner, False


class TrialLines(ray.tune.Callback):
    """One console line per trial start, finish, failure and retry, instead of Tune's tables."""

    def __init__(self, sweep: str):
        self.sweep, self.finished = sweep, []

    def say(self, trial, what: str) -> None:
        print(f"sweep {self.sweep}: {trial_name(trial)} {what}", flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.say(trial, "started")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.finished.append(trial)  # said at the end of this turn of Tune's loop, once its state is saved

    def on_step_end(self, iteration, trials, **info):
        for trial in self.finished:
            r = trial.last_result
            self.say(trial, f"finished: step {r.get('step')}, loss {_fmt(r.get('loss'))}"
                            + (f", val/loss {_fmt(r['val/loss'])}" if "val/loss" in r else ""))
        self.finished.clear()

    def on_trial_recover(self, iteration, trials, trial, **info):
        self.say(trial, f"failed ({last_error_line(trial)}); retrying ({trial.num_failures} of "
                        f"{trial.max_failures} retries)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.say(trial, f"failed: {last_error_line(trial)} (trace: {trial.path}/error.txt)")


def last_error_line(trial) -> str:
    path = trial.error_file
    if not path or not Path(path).is_file():
        return "no error file"
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    return lines[-1] if lines else "empty error file"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "-"


# ----------------------------------------------------------------------------- results
def result_point(result) -> str:
    """The point of a Tune result: its trial directory's name (``trial_name``; a trial that never
    reported has no config in its result)."""
    return posixpath.basename(result.path.rstrip("/"))


def result_rows(grid, points: list[SweepPoint]) -> list[dict]:
    """One row per point from Tune's ResultGrid: point, status (failed: an error; finished: its last
    report is at its planned steps; else unfinished), the last reported step, loss and val/loss, and
    the error's last line."""
    planned = {p.name: p.cfg.train.steps for p in points}
    rows = {}
    for result in grid:
        m, name = result.metrics or {}, result_point(result)
        status = "failed" if result.error else "finished" if m.get("step") == planned.get(name) else "unfinished"
        error = str(result.error).strip().splitlines()[-1] if result.error and str(result.error).strip() else ""
        rows[name] = {"point": name, "status": status, "steps": m.get("step", ""), "loss": m.get("loss", ""),
                      "val/loss": m.get("val/loss", ""), "error": error}
    for p in points:
        rows.setdefault(p.name, {"point": p.name, "status": "unfinished", "steps": "", "loss": "", "val/loss": "",
                                 "error": "added to the sweep file after its Tune experiment began: not run "
                                          "(give the sweep a new out_dir)"})
    return sorted(rows.values(), key=lambda r: r["point"])


def write_results(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def format_results(rows: list[dict]) -> str:
    cells = [COLUMNS] + [[_fmt(r[c]) if c in ("loss", "val/loss") else str(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells)


# ----------------------------------------------------------------------------- the driver
def prepare_points(points: list[SweepPoint]) -> None:
    """Absolute run directories (trials and workers may not share the driver's cwd), relative data
    paths meaning the driver's cwd, the S3 endpoint for the cluster's processes."""
    for point in points:
        prepare_driver(point.cfg)


def run_sweep(spec: SweepSpec, retry_failed: bool = False, address: str = "") -> list[dict]:
    """Run the sweep's points as Tune trials (a new experiment, or the earlier one resumed); returns
    the results table's rows (``result_rows``), also written to ``<out_dir>/results.csv``."""
    points = expand(spec)  # every point's config validated before anything starts
    prepare_points(points)
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")  # Tune's state saved at every turn of its loop
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")  # a failure is one line of ours (the trace: error.txt)
    out_dir = Path(spec.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = connect(spec, points, address)
    try:
        limit = concurrency(spec, points, ray.cluster_resources())
        tuner, restored = make_tuner(spec, points, retry_failed, limit)
        print(f"sweep {spec.name}: {len(points)} points, up to {limit} at once; "
              + (f"restored {tune_experiment_path(spec, points)}" if restored else
                 f"experiment {tune_experiment_path(spec, points)}"), flush=True)
        rows = result_rows(tuner.fit(), points)
    finally:
        if started:
            ray.shutdown()
    write_results(rows, out_dir / RESULTS_FILE)
    return rows
