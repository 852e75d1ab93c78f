"""What users watch: a JSONL metrics file and a progress bar. Observes training, never changes it;
values arrive already on the host (the loop syncs once per logging interval)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, out_dir: str | Path, total_steps: int, start_step: int = 0, rank: int = 0,
                 progress: bool = True):
        self.rank = rank
        self.path = Path(out_dir) / "metrics.jsonl"
        self.bar = None
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if progress:
                self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                                dynamic_ncols=True, file=sys.stderr, mininterval=1.0)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, record: dict) -> None:
        if self.rank != 0:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                  if k in ("loss", "flow_matching", "lr", "samples_per_s")}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_metrics(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
