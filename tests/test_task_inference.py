"""Super-resolution, depth and captioning after training: the session's tiny run of each (``task_runs``,
tests/support/task_runs.py: ``train()`` in this process, shared with tests/test_tasks_training.py; 2 grid
rows, the task eval on 60 unseen scenes, 2 ODE steps, no guidance), then its grid and task metrics,
``TaskPredictor``, ``crossflow eval superres|depth|caption`` and ``crossflow caption`` on its checkpoint,
and the errors for a wrong one."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cluster.cli import main
from data_pipeline.image_ops import area_downsample
from tests.conftest import tiny_overrides
from tests.support.task_runs import STEPS, TASK_OVERRIDES
from trainer.config import load_config
from trainer.inference import labeled_grid_size
from trainer.metrics import read_metrics
from trainer.task_inference import (CAPTION_LABEL_WIDTH, GRID_SIDE, heldout_samples, load_task_predictor,
                                    replicate_pixels)

TASKS = list(TASK_OVERRIDES)
METRICS = {"super_resolution": ("psnr", "ssim"), "depth": ("abs_rel", "delta1"),
           "captioning": ("bleu4", "overall", "parsed")}
GRID_COLUMNS = {"super_resolution": 4, "depth": 4, "captioning": 3}  # input | (bicubic) | 2 seeds or 1 output | truth
SIDE = 32


@pytest.mark.parametrize("name", TASKS)
def test_training_writes_the_task_grid_and_metric_against_its_baseline(task_runs, name):
    run, summary = task_runs[name]
    for metric in METRICS[name]:
        assert np.isfinite(summary[f"task/{metric}"]) and np.isfinite(summary[f"task/baseline_{metric}"])
    assert json.loads((run / "summary.json").read_text())[f"task/{METRICS[name][0]}"] == summary[f"task/{METRICS[name][0]}"]
    logged = {k for r in read_metrics(run / "metrics.jsonl") for k in r}
    assert {f"task/{METRICS[name][0]}", f"task/baseline_{METRICS[name][0]}"} <= logged
    assert ("shapes_eval/overall" in summary) == (name == "super_resolution")
    width = CAPTION_LABEL_WIDTH if name == "captioning" else None
    with Image.open(run / "samples" / "final.png") as grid:
        expected = labeled_grid_size(2, GRID_COLUMNS[name], SIDE, GRID_SIDE // SIDE,
                                     **({"label_width": width} if width else {}))
        assert grid.size == expected
    assert (run / "eval" / f"task_step_{STEPS:08d}.txt").read_text().startswith(f"{name} on 60 unseen shapes scenes")


def test_predictor_outputs_per_task(task_runs):
    samples = heldout_samples(load_config(None, tiny_overrides("unused")), 3)
    images = [s["image"] for s in samples]
    sr = load_task_predictor(task_runs["super_resolution"][0])
    low = [np.asarray(Image.fromarray(im).resize((16, 16), Image.BOX)) for im in images]
    out = sr.predict(low, steps=2)
    assert [(o.shape, o.dtype) for o in out] == [((SIDE, SIDE, 3), np.uint8)] * 3
    assert not sr.variational and all((a == b).all() for a, b in zip(out, sr.predict(low, seed=7, steps=2)))
    with pytest.raises(ValueError, match=r"expected uint8 \(16, 16, 3\)"):
        sr.predict(images)

    depth = load_task_predictor(task_runs["depth"][0])
    maps = depth.predict(images, steps=2)
    assert [(m.shape, m.dtype) for m in maps] == [((SIDE, SIDE), np.float32)] * 3
    assert all(np.isfinite(m).all() and (m > 0).all() for m in maps)
    again, other = depth.predict(images, seed=0, steps=2), depth.predict(images, seed=1, steps=2)
    assert all((a == b).all() for a, b in zip(maps, again)) and any((a != b).any() for a, b in zip(maps, other))
    mean = depth.predict(images, seed=0, steps=2, use_mean=True)
    assert all((a == b).all() for a, b in zip(mean, depth.predict(images, seed=1, steps=2, use_mean=True)))

    captioner = load_task_predictor(task_runs["captioning"][0])
    captions = captioner.predict(images, steps=2)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)


def test_replicated_pixels_area_downsample_to_the_input():
    """Super-resolution's predict hands training's source_inputs a full-size image whose area
    downsample is exactly the low-res input."""
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(area_downsample(replicate_pixels(x, 32), 16), x)


def test_eval_commands_print_and_write_model_and_baseline(task_runs, tmp_path, capsys):
    for command, name in (("superres", "super_resolution"), ("depth", "depth"), ("caption", "captioning")):
        out = tmp_path / f"{command}.json"
        assert main(["eval", command, "--checkpoint", str(task_runs[name][0]), "--num", "4", "--steps", "2",
                     "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"{name} on 4 unseen shapes scenes" in printed and METRICS[name][0] in printed
        written = json.loads(out.read_text())
        assert written["task"] == name and written["num"] == 4
        assert set(METRICS[name]) <= set(written["model"]) and set(METRICS[name]) <= set(written["baseline"])
        assert ("shapes_eval" in written) == (name == "super_resolution")
    assert main(["eval", "caption", "--checkpoint", str(task_runs["captioning"][0]), "--num", "4", "--steps", "2",
                 "--split", "heldout"]) == 0  # composition: scenes with a color-shape pair training never has
    assert "captioning on 4 shapes scenes of held-out color-shape pairs" in capsys.readouterr().out
    cfg = load_config(None, tiny_overrides("unused"))
    assert [s["scene"].is_heldout() for s in heldout_samples(cfg, 3, "heldout")] == [True] * 3
    assert [s["scene"].is_heldout() for s in heldout_samples(cfg, 3)] == [False] * 3
    photos = tmp_path / "photos"  # super-resolution of your own images (resized to 32 px): PSNR and SSIM only
    photos.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(photos / f"{i}.png")
    out = tmp_path / "photos.json"
    assert main(["eval", "superres", "--checkpoint", str(task_runs["super_resolution"][0]), "--images", str(photos),
                 "--steps", "2", "--out", str(out)]) == 0
    assert f"super_resolution on 3 images from {photos}" in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["num"] == 3 and "shapes_eval" not in written and set(written["baseline"]) == {"psnr", "ssim"}


def test_caption_command_and_wrong_checkpoints(task_runs, tmp_path, capsys):
    png = tmp_path / "scene.png"
    Image.fromarray(heldout_samples(load_config(None, tiny_overrides("unused")), 1)[0]["image"]).save(png)
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(big)  # resized to the checkpoint's 32 px
    assert main(["caption", "--checkpoint", str(task_runs["captioning"][0]), "--image", str(png), "--image", str(big),
                 "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(png), str(big)]
    with pytest.raises(SystemExit, match="image not found: .*missing.png"):
        main(["caption", "--checkpoint", str(task_runs["captioning"][0]), "--image", str(tmp_path / "missing.png")])
    with pytest.raises(SystemExit, match=r"is a checkpoint of depth \(task.source=image_ve, task.target=depth\), "
                                         r"not of captioning"):
        main(["caption", "--checkpoint", str(task_runs["depth"][0]), "--image", str(png)])
    with pytest.raises(SystemExit, match=r"super_resolution \(task.source=upsample.*not of depth"):
        main(["eval", "depth", "--checkpoint", str(task_runs["super_resolution"][0])])
    with pytest.raises(SystemExit, match="captioning .*not of text_to_image"):
        main(["sample", "--checkpoint", str(task_runs["captioning"][0]), "--prompt", "a red circle on the left"])
    not_weights = tmp_path / "latest"  # e.g. DeepSpeed's tag file in checkpoints/, given as the checkpoint
    not_weights.write_text("step_00000004")
    assert main(["caption", "--checkpoint", str(not_weights), "--image", str(png)]) == 2
    assert f"checkpoint error: {not_weights} is not a safetensors file" in capsys.readouterr().err
