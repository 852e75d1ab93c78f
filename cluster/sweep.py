"""``crossflow sweep run``: a grid of training runs (model sizes, steps, batch, LR...) on Ray.

A sweep file (``configs/sweeps/*.yaml``)::

    name: tiny_sizes                  # also the W&B group of every run
    base_config: configs/demo.yaml    # the training config every run starts from
    out_dir: runs/sweeps/tiny_sizes   # one run directory per grid point below it
    overrides: [train.steps=200]      # applied to every run
    grid:                             # the cartesian product of these values
      model.hidden_size: [64, 128, 192]
    resources: {cpus: 1, gpus: 0}     # per run (one Ray task each)
    max_concurrent: 2                 # at most this many runs at once (the cluster may allow fewer)

Each run is a Ray task with its own resources, running ``trainer.loop.train`` as one rank in a
fresh worker process. Runs go concurrently as the cluster allows. The sweep is resumable: a run
whose ``summary.json`` shows its planned steps is not run again; a run that was interrupted
resumes from its latest checkpoint; a failed run is recorded in ``sweep_state.json`` and retried
with ``--retry-failed``. ``crossflow sweep analyze <out_dir>`` then fits the scaling law.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from trainer.config import load_config
from trainer.sweep_spec import SweepSpec, expand, load_sweep

STATE_FILE = "sweep_state.json"


def is_finished(run_dir: Path, steps: int) -> bool:
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return False
    try:
        return json.loads(summary.read_text()).get("steps") == steps
    except json.JSONDecodeError:
        return False


def _train_task(base_config: str, overrides: list[str]) -> dict:
    from trainer.loop import train
    return train(load_config(base_config, overrides))


def run_sweep(spec: SweepSpec, retry_failed: bool = False, address: str = "") -> dict[str, str]:
    """Run every unfinished grid point; returns run name -> finished | skipped | failed: <error>."""
    import ray
    runs = {p.name: p.overrides for p in expand(spec)}
    root = Path(spec.out_dir)
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    todo = {}
    for name, overrides in runs.items():
        cfg = load_config(spec.base_config, overrides)
        if is_finished(Path(cfg.train.out_dir), cfg.train.steps):
            state[name] = "finished"
        elif str(state.get(name, "")).startswith("failed") and not retry_failed:
            print(f"sweep {spec.name}: {name} failed before; not retried (use --retry-failed)")
        else:
            todo[name] = overrides
    started = False
    if todo and not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            cpus = max(1, spec.resources.get("cpus", 1)) * max(1, spec.max_concurrent or len(todo))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
            started = True
    try:
        # max_calls=1: every run in a fresh worker process (its own process group, DeepSpeed state, memory)
        task = ray.remote(max_calls=1)(_train_task).options(num_cpus=spec.resources.get("cpus", 1),
                                                             num_gpus=spec.resources.get("gpus", 0),
                                                runtime_env={"env_vars": {"OMP_NUM_THREADS": str(
                                                    max(1, int(spec.resources.get("cpus", 1))))}})
        pending, in_flight = list(todo.items()), {}
        limit = spec.max_concurrent or len(todo)
        t0 = time.time()
        while pending or in_flight:
            while pending and len(in_flight) < limit:
                name, overrides = pending.pop(0)
                print(f"sweep {spec.name}: starting {name}", flush=True)
                in_flight[task.remote(spec.base_config, overrides)] = name
            done, _ = ray.wait(list(in_flight), num_returns=1)
            name = in_flight.pop(done[0])
            try:
                summary = ray.get(done[0])
                state[name] = "finished"
                print(f"sweep {spec.name}: {name} finished in {time.time() - t0:.0f} s, final loss "
                      f"{summary.get('final_loss')}", flush=True)
            except Exception as e:  # a failed run is recorded and the others go on
                state[name] = f"failed: {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}"
                print(f"sweep {spec.name}: {name} {state[name]}", flush=True)
            state_path.write_text(json.dumps(state, indent=2))
    finally:
        if started:
            ray.shutdown()
    state_path.write_text(json.dumps(state, indent=2))
    return state


def add_sweep_run_command(sweep_subparsers) -> None:
    """``crossflow sweep run`` on the ``sweep`` parser of ``trainer.sweep_cli``."""
    p = sweep_subparsers.add_parser("run", help="run a sweep's grid of training runs on Ray",
                                    description=__doc__.split("\n\n")[0] + " See cluster/sweep.py for the file format.")
    p.add_argument("--config", required=True, help="sweep file (configs/sweeps/<name>.yaml)")
    p.add_argument("--address", default="", help="Ray cluster address (default: RAY_ADDRESS or an embedded cluster)")
    p.add_argument("--retry-failed", action="store_true", help="run again the runs that failed before")
    p.set_defaults(func=_run)


def _run(args) -> int:
    import os
    spec = load_sweep(args.config)
    state = run_sweep(spec, args.retry_failed, args.address or os.environ.get("RAY_ADDRESS", ""))
    for name, status in state.items():
        print(f"{name}: {status}")
    print(f"analyze with: crossflow sweep analyze {spec.out_dir}")
    return 0 if all(s == "finished" for s in state.values()) else 1
