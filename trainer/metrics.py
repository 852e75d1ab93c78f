"""What users watch: a JSONL metrics file, W&B (offline by default) and the progress on the console.

Observes training, never changes it. Values arrive already on the host: the loop syncs once per
logging interval. Only rank 0 writes or prints: the other ranks' records are the same numbers.

Progress: on a terminal, one live tqdm line; otherwise (a log file, a pipe, a Ray worker, whose
stdout is never a terminal) one plain line per logging interval, since a bar redrawn with carriage
returns becomes one line per update there.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


SHOWN = ("loss", "flow_matching", "lr", "samples_per_s", "mfu", "val/loss")  # the numbers the progress shows
LINE_FORMAT = {"loss": ".4f", "flow_matching": ".4f", "lr": ".2e", "samples_per_s": ".1f", "mfu": ".3f",
               "val/loss": ".4f"}


class ProgressLines:
    """One line per logging interval, for output that is not a terminal:
    ``step 40/1500 (2%)  loss 1.2345  flow_matching 1.1000  lr 2.00e-04  samples_per_s 52.1  eta 12m30s``.
    A record without a loss (an evaluation) prints its numbers after the step."""

    def __init__(self, total_steps: int, start_step: int = 0, file=None):
        self.total, self.start_step, self.file = total_steps, start_step, file
        self.t0 = time.perf_counter()

    def eta(self, step: int) -> str:
        done = step - self.start_step
        if done <= 0 or step >= self.total:
            return ""
        left = (time.perf_counter() - self.t0) / done * (self.total - step)
        return f"  eta {format_duration(left)}"

    def print(self, record: dict) -> None:
        step = record["step"]
        if "loss" in record:
            numbers = "  ".join(f"{k} {record[k]:{LINE_FORMAT[k]}}" for k in SHOWN if k in record)
            line = f"step {step}/{self.total} ({100 * step // max(1, self.total)}%)  {numbers}{self.eta(step)}"
        else:  # an evaluation: "step 500 shapes_eval: overall 0.07  object 0.52 ..."
            values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
            groups = {k.split("/")[0] for k in values if "/" in k}
            group = groups.pop() if len(groups) == 1 and all("/" in k for k in values) else ""
            numbers = "  ".join(f"{k.removeprefix(group + '/') if group else k} {v:.4g}" for k, v in values.items())
            line = f"step {step} {group + ': ' if group else ''}{numbers}"
        print(line, file=self.file or sys.stdout, flush=True)


def format_duration(seconds: float) -> str:
    """``59s``, ``12m30s``, ``3h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class MetricsLogger:
    """Rank 0 appends one JSON record per logging interval to ``<out_dir>/metrics.jsonl``. Opened
    at ``start_step`` (a resume), it first drops the records of later steps, which the run redoes:
    after a restart from an earlier checkpoint each step is recorded once, the redone one winning.
    W&B (the same run id, ``resume="allow"``) ignores steps below the run's current one, so there
    the first values of redone steps stay; its rewind (``resume_from``, beta, done by the server)
    is not used."""

    def __init__(self, out_dir: str | Path, log_cfg, config: dict, total_steps: int, start_step: int = 0,
                 rank: int = 0):
        self.rank = rank
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.bar = None
        self.bar_numbers: dict[str, str] = {}  # the live bar's postfix: each shown number's latest value
        self.lines: ProgressLines | None = None
        self.wandb_run = None
        if rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        drop_records_after(self.path, start_step)
        if log_cfg.progress and sys.stderr.isatty():
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        elif log_cfg.progress:
            self.lines = ProgressLines(total_steps, start_step)
        if log_cfg.wandb != "disabled":
            self.wandb_run = _init_wandb(self.out_dir, log_cfg, config)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.bar is not None:
            self.bar_numbers.update({k: f"{v:.4g}" for k, v in record.items() if k in SHOWN})
            self.bar.set_postfix(self.bar_numbers, refresh=False)
        if self.lines is not None:
            self.lines.print(record)

    def log_image(self, path: str | Path, step: int, key: str = "samples", caption: str = "") -> None:
        if self.rank == 0 and self.wandb_run is not None:
            import wandb
            self.wandb_run.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            import wandb
            self.wandb_run.finish()
            self.wandb_run = None
            wandb.teardown()  # stop the wandb-core service now, not at interpreter exit (Ray kills that)


def _init_wandb(out_dir: Path, log_cfg, config: dict):
    import wandb
    # A stable id per run directory: a resumed run continues the same W&B run.
    run_id = hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=log_cfg.wandb_project, group=log_cfg.wandb_group or None,
                      name=log_cfg.wandb_name or out_dir.name, id=run_id, resume="allow",
                      dir=str(out_dir), mode=log_cfg.wandb, config=config,
                      settings=wandb.Settings(console="off", x_disable_stats=True))


def drop_records_after(path: Path, step: int) -> None:
    """Rewrite ``path`` without the records of steps after ``step`` (and without a line torn by a
    crash mid-write), atomically: a temporary file renamed over it, so a crash loses nothing."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (at := _record_step(line)) is not None and at <= step]
    if len(kept) == len(lines):
        return
    from trainer.checkpoint import atomic_write_text
    atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def _record_step(line: str) -> int | None:
    """The step of one metrics.jsonl line, or None for a blank or torn line."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def peak_memory_bytes(device) -> int:
    """Peak allocated memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    import torch
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
