"""The tasks beside text to image (trainer/tasks.py): super-resolution, depth and captioning train
end to end through ``train()`` (one process, the real DeepSpeed engine, tiny model; the session's
``task_runs``, tests/support/task_runs.py, shared with tests/test_task_inference.py); captioning
resumes exactly and its two-stage variant freezes the caption autoencoder; the task section's
validation names the keys."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_overrides
from tests.support.task_runs import CHECKPOINT_EVERY, STEPS, task_config
from trainer.checkpoint import WEIGHTS_FILE
from trainer.config import ConfigError, load_config
from trainer.loop import train
from trainer.metrics import read_metrics
from trainer.model_input import saved_model_input

FLOW_SHAPES = {"super_resolution": [3, 32, 32], "depth": [1, 32, 32], "captioning": [4, 8, 8]}
CAPTION_AUTOENCODER = "caption."  # parameter names of the model's caption autoencoder (CrossFlow.caption)


def step_records(run: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step_{step:08d}" / WEIGHTS_FILE)


@pytest.mark.parametrize("task", ["super_resolution", "depth"])
def test_task_trains_and_checkpoints(task_runs, task):
    run, summary = task_runs[task]
    records = step_records(run)
    assert sorted(records) == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["flow_matching"]) for r in records.values())
    if task == "depth":
        assert all(r["kl"] > 0 for r in records.values())  # the image VE is variational
    validation = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r}
    assert sorted(validation) == [CHECKPOINT_EVERY, STEPS]
    assert all(math.isfinite(r["val/loss"]) for r in validation.values())
    assert ("val/kl" in validation[STEPS]) == (task == "depth")  # an upsampled image has no posterior
    assert summary["val/loss"] == validation[STEPS]["val/loss"]
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == f"step_{STEPS:08d}" and (ckpt / WEIGHTS_FILE).is_file()
    assert json.loads((ckpt / "model.json").read_text())["latent_shape"] == FLOW_SHAPES[task]
    saved = saved_model_input(ckpt)
    assert saved.task == task and list(saved.latent_shape) == FLOW_SHAPES[task]


def test_captioning_trains_and_resumes_exactly(task_runs, tmp_path):
    """The shared captioning run (a checkpoint every 2 steps, a constant rate after warmup) and a restart
    from its step 2 (without the end-of-training task eval, which follows the last step): the same
    per-step losses, caption terms included (the caption VE's eps is keyed by seed, step and sample like
    z0's), and the same validation loss."""
    straight = task_runs["captioning"][0]
    resumed = tmp_path / "resumed"
    restart = straight / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}"
    train(task_config(resumed, "captioning", **{"eval.shapes": False, "train.resume": restart}))
    a, b = step_records(straight), step_records(resumed)
    replayed = list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
    assert sorted(a) == list(range(1, STEPS + 1)) and sorted(b) == replayed
    for r in a.values():
        assert all(math.isfinite(r[k]) for k in ("loss", "flow_matching", "caption_ce", "caption_kl"))
        assert r["caption_ce"] > 0
    for step in replayed:
        for key in ("loss", "flow_matching", "caption_ce", "caption_kl"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-7), (step, key)
    val_a, val_b = ({r["step"]: r["val/loss"] for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r}
                    for run in (straight, resumed))
    assert sorted(val_a) == [CHECKPOINT_EVERY, STEPS] and val_b[STEPS] == pytest.approx(val_a[STEPS], rel=1e-6)
    assert saved_model_input(straight).latent_shape == (4, 8, 8)


def test_two_stage_captioning_freezes_the_caption_autoencoder(tmp_path):
    """task.target_pretrain_steps=2: steps 1-2 train the caption autoencoder alone (flow matching 0,
    the flow exactly still), steps 3-4 the flow and the image VE with the caption autoencoder exactly
    still (live weights: no EMA; a checkpoint per step)."""
    run = tmp_path / "two_stage"
    train(task_config(run, "captioning", **{"task.target_pretrain_steps": 2, "train.steps": 4, "train.keep_last": 4,
                                            "train.ckpt_every": 1, "train.ema_decay": 0.0, "eval.shapes": False}))
    records = step_records(run)
    assert [records[s]["flow_matching"] for s in (1, 2)] == [0.0, 0.0]
    assert all(records[s]["flow_matching"] > 0 for s in (3, 4))
    w = {step: checkpoint_weights(run, step) for step in (1, 2, 4)}
    caption = [k for k in w[1] if k.startswith(CAPTION_AUTOENCODER)]
    rest = [k for k in w[1] if k not in caption]
    assert caption, sorted(w[1])[:10]

    def moved(names, a, b):
        return [k for k in names if not torch.equal(w[a][k], w[b][k])]
    assert moved(caption, 1, 2) and not moved(rest, 1, 2), "stage 1 trains the caption autoencoder alone"
    assert not moved(caption, 2, 4), "stage 2 moved the caption autoencoder"
    assert any(k.startswith("flow.") for k in moved(rest, 2, 4)), "stage 2 did not train the flow"
    assert any(k.startswith("image_ve.") for k in moved(rest, 2, 4)), "stage 2 did not train the image VE"


@pytest.mark.parametrize("values,message", [
    ({"task.source": "upsample", "task.target": "depth"}, "not a registered task"),
    ({"task.source": "upsample"}, "needs task.source_resolution > 0"),
    ({"task.source": "upsample", "task.source_resolution": 12}, "must divide data.resolution=32"),
    ({"task.source_resolution": 16}, "only upsample reads it"),
    ({"task.source": "image_ve", "task.target": "caption", "task.caption_latent": [4, 6, 6], "model.patch_size": 4},
     "divisible by the patch size 4"),
    ({"task.target_pretrain_steps": 3}, "needs task.target=caption"),
    ({"task.source": "image_ve", "task.target": "caption", "task.target_pretrain_steps": 4},
     "must be less than train.steps=4"),
    ({"task.source": "image_ve", "task.target": "depth", "objective.ve_pretrain_steps": 2},
     "applies to task.source=text_ve only"),
    ({"task.source": "image_ve", "task.target": "depth", "objective.contrastive": "text_text"}, "has none"),
    ({"task.source": "image_ve", "task.target": "depth", "data.source": "mds", "data.path": "/x"},
     "data.source=mds"),
])
def test_task_config_errors_name_the_keys(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(None, tiny_overrides(tmp_path, **values))
