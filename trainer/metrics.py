"""What users watch: a JSONL metrics file, W&B (offline by default) and a progress bar.

Observes training, never changes it. Values arrive already on the host: the loop syncs once per
logging interval. Only rank 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out_dir: str | Path, log_cfg, config: dict, total_steps: int, start_step: int = 0,
                 rank: int = 0):
        self.rank = rank
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        if rank != 0:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if log_cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
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
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                  if k in ("loss", "flow_matching", "lr", "samples_per_s", "mfu")}, refresh=False)

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
