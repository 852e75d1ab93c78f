"""Observers of training: sample grids and ShapesEval (text-to-image), task grids and task metrics
(super-resolution, depth, captioning). They watch, never change training.

``trainer.loop.train`` calls, on every rank and in this order, each observer's
``on_batch(batch)`` for every micro-batch it draws, ``on_step_end(step)`` after each optimizer step
(after that step's logging and checkpoint) and ``on_train_end(step, stopped)`` after the final
checkpoint. Sampling runs the EMA weights and is collective under ZeRO-3 (every rank runs the
forward passes); rank 0 writes the files. Sampling draws z0 from generators seeded per grid
column (``trainer.sampling.encode_prompts``), not from the training RNG streams.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_pipeline.features import CaptionCache
from data_pipeline.shapes import ShapesGenerator, caption as scene_caption, render
from trainer.inference import Generator, labeled_grid

GRID_SEEDS = 4  # samples per prompt in a grid: enough to see the spread a prompt gets, one row wide
GRID_SCALE = 4  # grid pixels per image pixel: 32-pixel shapes samples are legible at 128


class Observer:
    """Base: every hook does nothing."""

    def on_batch(self, batch: dict) -> None:
        pass

    def on_step_end(self, step: int) -> None:
        pass

    def on_train_end(self, step: int, stopped: bool) -> None:
        pass

    def summary(self) -> dict[str, float]:
        """What this observer adds to the run's summary.json."""
        return {}


def heldout_prompts(cfg, n: int) -> list:
    """The first ``n`` scenes of the held-out split (attribute pairs never seen in training)."""
    gen = ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "heldout", cfg.data.seed)
    return [gen.scene(i) for i in range(n)]


class SeenSamples:
    """The first ``limit`` training samples' captions and targets (stored latent or image, on the
    CPU): prompts and reference column of the sample grids for shard data."""

    def __init__(self, limit: int):
        self.limit, self.captions, self.targets = limit, [], []

    def add(self, batch: dict) -> None:
        take = self.limit - len(self.captions)
        if take <= 0:
            return
        self.captions += list(batch["caption"])[:take]
        target = batch["latent"] if "latent" in batch else batch.get("image")
        if target is not None:
            self.targets += list(target[:take].detach().cpu())  # each (C, h, w)


def sample_grid_rows(gen: Generator, prompts: list[str], references: list | None, seeds: int = GRID_SEEDS) -> list:
    samples = [gen.generate(prompts, seed=k) for k in range(seeds)]  # seeds x B images
    return [([references[i]] if references else []) + [samples[k][i] for k in range(seeds)]
            for i in range(len(prompts))]


def reference_images(gen: Generator, seen: SeenSamples, n: int, side: int) -> list[np.ndarray] | None:
    """The stored samples behind the first ``n`` seen captions as (side, side, 3) uint8 images: a latent
    decoded by the codec, an image as it is; resized to the samples' side."""
    if len(seen.targets) < n:
        return None
    from PIL import Image
    images = gen.images(torch.stack(seen.targets[:n]))  # (n, C, h, w) -> n x (H, W, 3)
    return [im if im.shape[0] == side else np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC))
            for im in images]


def grid_title(sample, step: int) -> str:
    """The sampling settings of a grid, in one line: what a reader needs to reproduce a row."""
    start = "z0 = mu (VE mean)" if sample.use_mean else "z0 = mu + sigma * eps"
    return f"step {step}: {start}, cfg scale {sample.cfg_scale:g}, {sample.steps} {sample.solver} steps"


class GridSchedule:
    """When a grid observer writes (``self.write(path, step)``): every ``train.sample_every`` steps
    (``samples/step_N.png``) and at the end (``samples/final.png``), not after a stop request (it
    wants the checkpoint, not the minutes of sampling)."""

    def on_step_end(self, step: int) -> None:
        every = self.cfg.train.sample_every
        if every and step % every == 0 and step < self.cfg.train.steps:
            self.write(Path(self.cfg.train.out_dir) / "samples" / f"step_{step:08d}.png", step)

    def on_train_end(self, step: int, stopped: bool) -> None:
        if not stopped:
            self.write(Path(self.cfg.train.out_dir) / "samples" / "final.png", step)


class SampleGrids(GridSchedule, Observer):
    """Every ``train.sample_every`` steps and at the end (not after a stop request: it wants the
    checkpoint, not the minutes of sampling): ``samples/step_N.png`` / ``final.png``, one row per
    prompt (``sample.prompts_file``, else held-out shapes scenes with the generator's own rendering
    first, else captions seen in training with their stored sample, decoded, first), then
    ``GRID_SEEDS`` EMA samples (seeds 0, 1, ...) decoded by ``codec``; the prompt's text on the left,
    column labels and the sampling settings on top; logged as images."""

    def __init__(self, cfg, engine, codec, captions: CaptionCache, metrics, rank: int):
        self.cfg, self.engine, self.codec, self.captions = cfg, engine, codec, captions
        self.metrics, self.rank = metrics, rank
        self.seen = SeenSamples(cfg.sample.num_prompts)

    def on_batch(self, batch: dict) -> None:
        self.seen.add(batch)


    def prompts(self) -> tuple[list[str], list | None]:
        """The grid's prompts and, when known without sampling, their reference images."""
        cfg = self.cfg
        if cfg.sample.prompts_file:
            lines = Path(cfg.sample.prompts_file).read_text().splitlines()
            return [line.strip() for line in lines if line.strip()][:cfg.sample.num_prompts], None
        if cfg.data.source == "shapes":
            scenes = heldout_prompts(cfg, cfg.sample.num_prompts)
            return [scene_caption(s) for s in scenes], [render(s, cfg.data.resolution) for s in scenes]
        return self.seen.captions[:cfg.sample.num_prompts], None

    def write(self, path: Path, step: int) -> None:
        prompts, refs = self.prompts()
        with self.engine.ema_weights() as model:
            model.eval()
            gen = Generator(model, self.codec, self.captions, self.cfg, self.engine.device)
            rows = sample_grid_rows(gen, prompts, refs)
            if refs is None and not self.cfg.sample.prompts_file:
                refs = reference_images(gen, self.seen, len(prompts), rows[0][0].shape[0])
                rows = [[refs[i]] + row for i, row in enumerate(rows)] if refs else rows
            model.train()
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            columns = (["reference"] if len(rows[0]) > GRID_SEEDS else []) + [f"seed {k}" for k in range(GRID_SEEDS)]
            labeled_grid(rows, prompts, columns, scale=GRID_SCALE, title=grid_title(self.cfg.sample, step)).save(path)
            path.with_suffix(".txt").write_text("\n".join(f"row {i}: {p}" for i, p in enumerate(prompts)) + "\n")
        self.metrics.log_image(path, step)


class EvalSchedule:
    """When an evaluating observer scores (``self.evaluate(step, final)`` -> metrics): every
    ``eval.every`` steps and at the end (not after a stop request), each logged as metrics; the final
    scores are the observer's part of the run's summary."""
    final_scores: dict[str, float]

    def on_step_end(self, step: int) -> None:
        every = self.cfg.eval.every
        if every and step % every == 0 and step < self.cfg.train.steps:
            self.metrics.log({"step": step, **self.evaluate(step)})

    def on_train_end(self, step: int, stopped: bool) -> None:
        if not stopped:
            self.final_scores = self.evaluate(step, final=True)
            self.metrics.log({"step": step, **self.final_scores})

    def summary(self) -> dict[str, float]:
        return self.final_scores


class ShapesEvalObserver(EvalSchedule, Observer):
    """ShapesEval of the EMA weights every ``eval.every`` steps and at the end (not after a stop
    request); rank 0 writes ``eval/shapes_step_N.txt``; the scores are logged as metrics and the
    final ones kept in ``final_scores`` (``shapes_eval/<name>``) for the run's summary. The final
    evaluation also scores the same weights at each of ``eval.cfg_scales`` (``shapes_eval/<name>@cfg<s>``,
    tables ``eval/shapes_step_N_cfg<s>.txt``): guidance is a sampling choice, no retraining."""

    def __init__(self, cfg, engine, codec, captions: CaptionCache, metrics, rank: int):
        self.cfg, self.engine, self.codec, self.captions = cfg, engine, codec, captions
        self.metrics, self.rank = metrics, rank
        self.final_scores: dict[str, float] = {}

    def evaluate(self, step: int, final: bool = False) -> dict[str, float]:
        """``shapes_eval/<name>`` at ``sample.cfg_scale``, and at the end (``final``) ``shapes_eval/<name>@cfg<s>``
        for each of ``eval.cfg_scales`` (a scale equal to ``sample.cfg_scale`` reuses its samples)."""
        from trainer.config import at_cfg_scale, cfg_scale_name
        from trainer.eval.cli import sample_shapes_eval
        default = self.cfg.sample.cfg_scale
        cfg_scales = self.cfg.eval.cfg_scales if final else ()
        reports = {}
        with self.engine.ema_weights() as model:
            model.eval()
            gen = Generator(model, self.codec, self.captions, self.cfg, self.engine.device)
            for scale in (default, *(s for s in cfg_scales if s != default)):
                reports[scale] = sample_shapes_eval(gen, self.cfg.data.max_groups, self.cfg.eval.images_per_prompt,
                                                    cfg_scale=scale)
            model.train()
        scores = {f"shapes_eval/{k}": float(v) for k, v in reports[default].summary().items()}
        for scale in cfg_scales:
            scores.update({at_cfg_scale(f"shapes_eval/{k}", scale): float(v)
                           for k, v in reports[scale].summary().items()})
        if self.rank == 0:
            out = Path(self.cfg.train.out_dir) / "eval"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"shapes_step_{step:08d}.txt").write_text(reports[default].table() + "\n")
            for scale in cfg_scales:
                (out / f"shapes_step_{step:08d}_{cfg_scale_name(scale)}.txt").write_text(reports[scale].table() + "\n")
        return scores


class TaskObserver(Observer):
    """Base of the observers of a non-text task (super-resolution, depth, captioning): runs a
    ``trainer.task_inference.TaskPredictor`` over the EMA weights."""

    def __init__(self, cfg, engine, codec, captions: CaptionCache, metrics, rank: int):
        self.cfg, self.engine, self.codec, self.encoder = cfg, engine, codec, captions.encoder
        self.metrics, self.rank = metrics, rank

    def run(self, fn):
        """``fn(predictor)`` on the EMA weights (collective under ZeRO-3: every rank calls it)."""
        from trainer.task_inference import TaskPredictor
        with self.engine.ema_weights() as model:
            model.eval()
            try:
                return fn(TaskPredictor(model, self.codec, self.cfg, self.engine.device, self.encoder))
            finally:
                model.train()


class TaskGrids(GridSchedule, TaskObserver):
    """A non-text task's sample grid every ``train.sample_every`` steps and at the end (not after a
    stop request), like ``SampleGrids``: ``samples/step_N.png`` / ``final.png``, one row per held-out
    shapes scene (``sample.num_prompts``; shard data: the first training images), columns input |
    output (2 seeds when z0 is sampled) | ground truth (``trainer.task_inference.task_grid``); logged
    as images."""

    def __init__(self, *args):
        super().__init__(*args)
        self.seen: list[dict] = []  # shard data: the first training images and captions, the grid's rows


    def on_batch(self, batch: dict) -> None:
        from data_pipeline.shapes import tensor_array_to_image
        take = self.cfg.sample.num_prompts - len(self.seen)
        if take > 0 and self.cfg.data.source != "shapes" and "image" in batch:
            images = batch["image"][:take].detach().float().cpu().numpy()  # (k, 3, H, W) in [-1, 1]
            self.seen += [{"image": tensor_array_to_image(im), "caption": c}
                          for im, c in zip(images, list(batch["caption"])[:take])]

    def samples(self) -> list[dict]:
        """Unseen shapes scenes (what the task eval scores); for shard data the first images seen in
        training (super-resolution)."""
        from trainer.task_inference import heldout_samples
        if self.cfg.data.source == "shapes":
            return heldout_samples(self.cfg, self.cfg.sample.num_prompts)
        return self.seen

    def write(self, path: Path, step: int) -> None:
        from trainer.task_inference import task_grid
        samples = self.samples()
        if not samples:
            return
        grid = self.run(lambda predictor: task_grid(predictor, samples, step))
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            path.with_suffix(".txt").write_text("\n".join(f"row {i}: {s['caption']}" for i, s in enumerate(samples)) + "\n")
        self.metrics.log_image(path, step)


class TaskEvalObserver(EvalSchedule, TaskObserver):
    """A non-text task's metric on unseen shapes scenes against its trivial baseline
    (``trainer.task_inference.evaluate_task``: ``eval.images_per_prompt`` x the ShapesEval suite's
    prompt count scenes), every ``eval.every`` steps and at the end (not after a stop request):
    ``task/<metric>``, ``task/baseline_<metric>`` (and ``shapes_eval/<name>`` of super-resolution's
    outputs) logged as metrics, the final ones in the run's summary; rank 0 writes ``eval/task_step_N.txt``.
    Super-resolution on shards scores the validation shards' images instead (PSNR and SSIM only)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.final_scores: dict[str, float] = {}
        self.images: list | None = None  # shard data: the validation shards' images, read once

    def evaluate(self, step: int, final: bool = False) -> dict[str, float]:
        from trainer.task_inference import evaluate_task, heldout_shard_images
        if self.cfg.data.source == "shapes":
            result = self.run(evaluate_task)
        else:  # super-resolution on shards: PSNR/SSIM on the validation shards' images
            if self.images is None:
                self.images = heldout_shard_images(self.cfg)
            result = self.run(lambda predictor: evaluate_task(
                predictor, images=self.images, images_from=f"data.val_path={self.cfg.data.val_path}"))
        if self.rank == 0:
            out = Path(self.cfg.train.out_dir) / "eval"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"task_step_{step:08d}.txt").write_text(result.table() + "\n")
        return result.metrics()


def build_observers(cfg, engine, codec, captions: CaptionCache, metrics, rank: int) -> list[Observer]:
    """Text-to-image: sample grids always, ShapesEval when ``eval.shapes`` and the data is the shapes
    generator. Another task (super-resolution, depth, captioning): its grids always, its metric against
    the baseline under the same condition; super-resolution on shards: PSNR/SSIM vs bicubic on the
    first ``eval.val_samples`` images of ``data.val_path`` when it is set."""
    from trainer.tasks import task_of
    text = task_of(cfg).name == "text_to_image"
    grids, scores = (SampleGrids, ShapesEvalObserver) if text else (TaskGrids, TaskEvalObserver)
    observers: list[Observer] = [grids(cfg, engine, codec, captions, metrics, rank)]
    if cfg.eval.shapes and cfg.data.source == "shapes":
        observers.append(scores(cfg, engine, codec, captions, metrics, rank))
    elif not text and cfg.data.source != "shapes":  # super-resolution on shards (the one task they train)
        if cfg.data.val_path:
            observers.append(TaskEvalObserver(cfg, engine, codec, captions, metrics, rank))
        elif rank == 0:
            print("task metric (PSNR/SSIM vs bicubic) skipped: set data.val_path (held-out shards of images)",
                  flush=True)
    return observers
