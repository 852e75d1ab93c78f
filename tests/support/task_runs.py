"""One tiny training run per non-text task (super-resolution, depth, captioning), shared by the session:
tests/test_tasks_training.py checks its losses, validation and checkpoint, tests/test_task_inference.py
its grid, task metric, predictor and CLI. A run that needs its own training (a resume, two stages)
builds it with ``task_config`` so it differs from the shared runs only where it says."""
from __future__ import annotations

from pathlib import Path

from tests.conftest import tiny_overrides

TASK_OVERRIDES = {
    "super_resolution": {"task.source": "upsample", "task.target": "image", "task.source_resolution": 16},
    "depth": {"task.source": "image_ve", "task.target": "depth"},
    "captioning": {"task.source": "image_ve", "task.target": "caption"},
}
STEPS = 4  # warmup 2 steps (tiny_overrides), then 2 at the constant rate: a resume from CHECKPOINT_EVERY replays them
CHECKPOINT_EVERY = 2  # also the validation interval: val/loss at steps 2 and 4
# 64 distinct training scenes (the baselines fit on them), a 1-block flow, validation on 8 scenes x 2 times,
# the task eval on the default 60 held-out scenes (eval.images_per_prompt=1), grids of 2 rows, no guidance.
SHARED_VALUES = {"train.steps": STEPS, "train.global_batch_size": 8, "train.ckpt_every": CHECKPOINT_EVERY,
                 "optim.schedule": "constant", "data.num_samples": 64, "model.depth": 1,
                 "eval.val_every": CHECKPOINT_EVERY, "eval.val_samples": 8, "eval.val_t_points": 2,
                 "sample.cfg_scale": 1.0}


def task_config(run: Path, task: str, **extra):
    """The shared runs' config of ``task`` writing to ``run``, with ``extra`` overrides on top."""
    from trainer.config import load_config
    return load_config(None, tiny_overrides(run, **{**SHARED_VALUES, **TASK_OVERRIDES[task], **extra}))


def train_task_runs(tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """task -> (run directory, the summary ``train()`` returned), each trained once in this process."""
    from trainer.loop import train
    runs = {}
    for task in TASK_OVERRIDES:
        run = tmp_path_factory.mktemp(task) / "run"
        runs[task] = (run, train(task_config(run, task)))
    return runs
