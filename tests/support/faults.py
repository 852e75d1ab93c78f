"""Fault injection for tests, installed from outside production code.

A fault wraps a production function after import; production code has no hook for it.

- ``nan_loss_at(steps)``: the loss of those optimizer steps (1-based) becomes NaN before backward,
  so their gradients are non-finite and DeepSpeed skips the step (the NaN guard's case).
- ``kill_in_save(step)``: SIGKILL the process inside the save of ``step``, right after DeepSpeed
  wrote its files into the temporary directory (the atomic-save case).
- ``kill_after_step(step, marker, node_ip="")``: SIGKILL the first worker to finish optimizer step
  ``step`` (on the node with that IP when given), once: it writes ``marker`` (JSON: rank, pid, time)
  first, and no process kills itself while the marker exists (a restarted run passes the step again).
- ``kill_before_report(rank, step)``: SIGKILL that Ray Train worker after its checkpoint of
  ``step`` is complete but before it reports it to Ray (the lost-report case).

In this process: ``with installed(nan_loss_at([3])): train(cfg)``. In child processes (torchrun
ranks, Ray workers: they inherit the environment): ``env=fault_env(kill_in_save(8))`` puts
``faults_site/`` first on PYTHONPATH, whose ``sitecustomize`` installs the faults that
``CROSSFLOW_FAULTS`` names as their modules are imported.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

FAULTS_ENV = "CROSSFLOW_FAULTS"  # JSON list of [name, args] pairs
SITE_DIR = Path(__file__).resolve().parent / "faults_site"


@dataclass(frozen=True)
class Fault:
    """``patch(module)`` wraps a function of ``module`` and returns an undo."""
    name: str
    args: tuple
    module: str  # the module whose import installs the fault

    def patch(self, module):
        return PATCHES[self.name](module, *self.args)


def nan_loss_at(steps) -> Fault:
    return Fault("nan_loss_at", (sorted(int(s) for s in steps),), "trainer.engine")


def kill_in_save(step: int) -> Fault:
    return Fault("kill_in_save", (int(step),), "trainer.engine")


def kill_after_step(step: int, marker, node_ip: str = "") -> Fault:
    return Fault("kill_after_step", (int(step), str(marker), str(node_ip)), "trainer.engine")


def kill_before_report(rank: int, step: int) -> Fault:
    return Fault("kill_before_report", (int(rank), int(step)), "ray.train")


def measure_ema_weights(directory, peak_rss: bool = False) -> Fault:
    return Fault("measure_ema_weights", (str(directory), bool(peak_rss)), "trainer.engine")


def _replace(owner, name: str, wrap):
    original = getattr(owner, name)
    setattr(owner, name, wrap(original))
    return lambda: setattr(owner, name, original)


def _patch_nan_loss(engine_module, steps: list[int]):
    def wrap(backward):
        def backward_with_nan(self, loss):
            # DeepSpeed's global_steps counts optimizer steps taken or skipped (restored on resume)
            if self.ds.global_steps + 1 in steps:
                loss = loss * float("nan")
            return backward(self, loss)
        return backward_with_nan
    return _replace(engine_module.Engine, "backward", wrap)


def _patch_kill_in_save(engine_module, step: int):
    from trainer.checkpoint import tmp_tag

    def wrap(save):
        def save_then_die(self, directory, tag):
            save(self, directory, tag)
            if tag == tmp_tag(step):
                os.kill(os.getpid(), signal.SIGKILL)
        return save_then_die
    return _replace(engine_module.Engine, "save", wrap)


def _patch_kill_after_step(engine_module, step: int, marker: str, node_ip: str):
    import time

    def wrap(optimizer_step):
        def step_then_die(self):
            stepped = optimizer_step(self)
            if self.ds.global_steps == step and not os.path.exists(marker):
                if node_ip:
                    import ray.util
                    if ray.util.get_node_ip_address() != node_ip:
                        return stepped
                try:  # exclusive create: one process dies even when several pass the step at once
                    with open(marker, "x") as f:
                        f.write(json.dumps({"rank": self.dist.rank, "pid": os.getpid(), "time": time.time()}))
                except FileExistsError:
                    return stepped
                os.kill(os.getpid(), signal.SIGKILL)
            return stepped
        return step_then_die
    return _replace(engine_module.Engine, "step", wrap)


def _patch_kill_before_report(train_module, rank: int, step: int):
    def wrap(report):
        def die_then_report(metrics, *args, **kwargs):
            if train_module.get_context().get_world_rank() == rank and metrics.get("step") == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return report(metrics, *args, **kwargs)
        return die_then_report
    return _replace(train_module, "report", wrap)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def _patch_measure_ema_weights(engine_module, directory: str, peak_rss: bool):
    def wrap(build):
        def build_and_measure(self, *args, **kwargs):
            if peak_rss:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # peak RSS := current RSS
                before = _proc_status_bytes("VmRSS")
            weights = build(self, *args, **kwargs)
            record = {"bytes": sum(t.nbytes for t in (weights or {}).values())}
            if peak_rss:
                record["peak_rss_rise"] = _proc_status_bytes("VmHWM") - before
            Path(directory).mkdir(parents=True, exist_ok=True)
            with open(Path(directory) / f"ema_weights_rank{self.dist.rank}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            return weights
        return build_and_measure
    return _replace(engine_module.Engine, "ema_full_state_dict", wrap)


PATCHES = {"nan_loss_at": _patch_nan_loss, "kill_in_save": _patch_kill_in_save,
           "kill_before_report": _patch_kill_before_report,
           "kill_after_step": _patch_kill_after_step, "measure_ema_weights": _patch_measure_ema_weights}


@contextlib.contextmanager
def installed(*faults: Fault):
    """The faults, in this process, for the duration of the block."""
    import importlib
    undo = [f.patch(importlib.import_module(f.module)) for f in faults]
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


def fault_env(*faults: Fault, base: dict | None = None) -> dict:
    """Environment variables that install ``faults`` in every child Python process."""
    base = os.environ if base is None else base
    path = os.pathsep.join(p for p in (str(SITE_DIR), base.get("PYTHONPATH", "")) if p)
    return {FAULTS_ENV: json.dumps([[f.name, list(f.args), f.module] for f in faults]), "PYTHONPATH": path}


def faults_from_env(value: str) -> list[Fault]:
    return [Fault(name, tuple(args), module) for name, args, module in json.loads(value)]
