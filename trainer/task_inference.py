"""From a checkpoint of a non-text task to its outputs, and their scores against a trivial baseline.

``load_task_predictor(checkpoint)`` reads a checkpoint as ``crossflow sample`` does
(``trainer.inference.load_checkpoint_model``); ``TaskPredictor.predict`` runs the task's flow:

- super-resolution: low-res (s, s, 3) uint8 -> z0 as training builds it (``trainer.tasks.source_inputs``:
  bicubic up to data.resolution, through the codec) -> flow -> codec -> (R, R, 3) uint8;
- depth: (R, R, 3) uint8 -> the image VE's z0 -> flow -> (1, R, R) -> metric depth (R, R) in meters;
- captioning: (R, R, 3) uint8 -> the image VE's z0 -> flow to the text latent -> the caption decoder's
  logits -> argmax token ids -> the text encoder's ``decode_ids`` -> a caption.

z0 = mu + sigma * eps from a generator seeded by ``seed`` (``use_mean``: the VE's mean; the upsample
source has no noise). ``evaluate_task`` scores predictions on unseen shapes scenes (or held-out pairs) against the task's
trivial baseline (bicubic upsampling, the training scenes' mean depth map, the most frequent
training caption); ``task_grid`` draws the rows training writes to samples/final.png. Both serve the
training observers (``trainer.observers``) and ``crossflow eval superres|depth|caption``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.shapes import ShapesGenerator, image_to_tensor_array
from trainer.config import Config
from trainer.inference import decode_images, labeled_grid, load_checkpoint_model
from trainer.sampling import solve

PREDICT_BATCH = 64  # inputs per flow solve: bounds memory; predictions do not depend on the caller's batching
BASELINE_FIT_SAMPLES = 2000  # training scenes the mean depth map and the most frequent caption are taken from
TASK_COMMANDS = {"superres": "super_resolution", "depth": "depth", "caption": "captioning"}  # eval subcommand -> task
BASELINE_NAMES = {"super_resolution": "bicubic", "depth": "mean depth map", "captioning": "most frequent caption"}


def task_description(cfg: Config) -> str:
    """'depth (task.source=image_ve, task.target=depth)': how errors name a checkpoint's task."""
    from trainer.tasks import task_of
    return f"{task_of(cfg).name} (task.source={cfg.task.source}, task.target={cfg.task.target})"


def input_side(cfg: Config) -> int:
    """Side of the images ``predict`` takes: the low-res side for super-resolution, else data.resolution."""
    from trainer.tasks import task_of
    return cfg.task.source_resolution if task_of(cfg).name == "super_resolution" else cfg.data.resolution


def images_to_tensor(images: list[np.ndarray], side: int, what: str) -> torch.Tensor:
    """(side, side, 3) uint8 images -> (B, 3, side, side) float32 in [-1, 1]; a clear error for another shape."""
    for i, im in enumerate(images):
        if im.dtype != np.uint8 or im.shape != (side, side, 3):
            raise ValueError(f"{what}: input {i} is {im.dtype} {tuple(im.shape)}, expected uint8 ({side}, {side}, 3)")
    return torch.from_numpy(np.stack([image_to_tensor_array(im) for im in images]))  # (B, 3, side, side)


def replicate_pixels(images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, s, s) -> (B, C, side, side), each pixel repeated (side/s)^2 times (nearest neighbour; side a
    multiple of s): its area downsample to s is the input again, exactly."""
    if side % images.shape[-1]:
        raise ValueError(f"image side {images.shape[-1]} does not divide data.resolution={side}")
    return torch.nn.functional.interpolate(images, size=(side, side), mode="nearest")  # (B, C, side, side)


@dataclass
class TaskPredictor:
    """A model of a non-text task ready to predict: weights (EMA), the image codec (super-resolution's
    z0 and output), the text encoder (captioning's token decoding), the config it was trained with."""
    model: torch.nn.Module
    codec: object  # PixelCodec | LatentCodec; super-resolution only (None otherwise)
    config: Config
    device: torch.device
    text_encoder: object = None  # data_pipeline.features.TextEncoder; captioning only
    task: object = field(init=False)

    def __post_init__(self):
        from trainer.tasks import task_of
        self.task = task_of(self.config)
        if self.task.name == "text_to_image":
            raise ValueError("a text-to-image model has no task predictor: use trainer.inference.Generator")

    @property
    def variational(self) -> bool:
        """z0 depends on the seed (a learned VE source sampled at mu + sigma * eps)."""
        return bool(self.model.source_is_learned)

    @torch.no_grad()
    def flow(self, images: torch.Tensor, generator: torch.Generator, steps: int | None = None,
             solver: str | None = None, cfg_scale: float | None = None, use_mean: bool | None = None) -> torch.Tensor:
        """Input images (B, 3, h, w) in [-1, 1] -> the flow's end z1 (B, C, H, W), z0 built as training does
        and sampled with ``generator``."""
        from trainer.tasks import source_inputs
        s = self.config.sample
        images = images.to(self.device)
        if self.task.name == "super_resolution":  # training downsamples the full image: give it one whose
            images = replicate_pixels(images, self.config.data.resolution)  # area downsample is the input
        source = source_inputs(self.task, {"image": images}, self.codec, self.config, self.device)
        z0, _, _ = self.model.encode_source(source, use_mean=s.use_mean if use_mean is None else use_mean,
                                            generator=generator)  # (B, C, H, W)
        return solve(self.model, z0, steps or s.steps, solver or s.solver,
                     s.cfg_scale if cfg_scale is None else cfg_scale)

    def decode(self, z1: torch.Tensor) -> list:
        """The flow's end (B, C, H, W) -> the task's outputs: images, depth maps or captions."""
        from data_pipeline.shapes import tensor_array_to_depth
        if self.task.target == "image":
            return decode_images(self.codec, z1)
        if self.task.target == "depth":
            return [tensor_array_to_depth(z) for z in z1.float().cpu().numpy()]  # each (H, W) meters
        with torch.no_grad():
            logits = self.model.decode_caption(z1)  # (B, n, vocab)
        return self.text_encoder.decode_ids(logits.argmax(-1).cpu().numpy())

    def predict(self, inputs: list[np.ndarray], seed: int = 0, steps: int | None = None, solver: str | None = None,
                cfg_scale: float | None = None, use_mean: bool | None = None) -> list:
        """(h, w, 3) uint8 images -> one output each (see the module docstring), in batches of
        ``PREDICT_BATCH`` drawing their z0 noise in turn from one generator seeded by ``seed``."""
        x = images_to_tensor(list(inputs), input_side(self.config), f"{self.task.name} predict")
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        for start in range(0, len(x), PREDICT_BATCH):
            out += self.decode(self.flow(x[start:start + PREDICT_BATCH], g, steps, solver, cfg_scale, use_mean))
        return out


def load_task_predictor(checkpoint: str | Path, device: str | torch.device = "cpu", use_ema: bool = True,
                        vae: str | None = None, use_mean: bool | None = None) -> TaskPredictor:
    """A ``TaskPredictor`` from an export, a checkpoint directory or a run directory (its latest), as
    ``load_generator`` reads them; ``vae`` replaces super-resolution's autoencoder folder, ``use_mean``
    the config's ``sample.use_mean``. A text-to-image checkpoint is refused."""
    from data_pipeline.features import text_encoder_from_config
    from trainer.models.codecs import build_codec
    from trainer.tasks import task_of
    loaded = load_checkpoint_model(checkpoint, device, use_ema)
    cfg, task = loaded.config, task_of(loaded.config)
    if task.name == "text_to_image":
        raise ValueError(f"{checkpoint} is a text-to-image checkpoint ({task_description(cfg)}): "
                         f"use crossflow sample / crossflow eval shapes")
    if use_mean is not None:
        cfg.sample.use_mean = use_mean
    codec = build_codec(loaded.model_input, vae or "", loaded.device) if task.target == "image" else None
    encoder = text_encoder_from_config(cfg.data) if task.target == "caption" else None
    return TaskPredictor(loaded.model, codec, cfg, loaded.device, encoder)


# ----------------------------------------------------------------------------------------------
# Held-out scenes and the baselines


EVAL_SPLITS = ("unseen", "heldout")
SPLIT_NAMES = {"unseen": "unseen shapes scenes", "heldout": "shapes scenes of held-out color-shape pairs"}


def heldout_samples(cfg: Config, n: int, split: str = "unseen") -> list[dict]:
    """The first ``n`` shapes samples (image, caption, scene, depth) at data.resolution that training
    never saw: ``unseen``, scenes of the training distribution from the validation generator's own
    seed (``trainer.validation.shapes_validation_generator``); ``heldout``, scenes holding a color-shape
    pair the training split never has (composition: harder, above all for captioning)."""
    if split not in EVAL_SPLITS:
        raise ValueError(f"split must be one of {EVAL_SPLITS}, got {split!r}")
    from trainer.validation import shapes_validation_generator
    gen = shapes_validation_generator(cfg) if split == "unseen" else \
        ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "heldout", cfg.data.seed)
    return [gen.sample(i) for i in range(n)]


def heldout_shard_images(cfg: Config) -> list[np.ndarray]:
    """The first ``eval.val_samples`` images of ``data.val_path`` (the validation shards), in stored
    order, (R, R, 3) uint8 at data.resolution: super-resolution's held-out truth on shard data. Every
    rank reads them all (MDS readers are collective)."""
    import contextlib
    from data_pipeline.readers import read_records
    from data_pipeline.sources import decode_rgb
    from trainer.validation import validation_cache_dir
    path, n, images = cfg.data.val_path, cfg.eval.val_samples, []
    with contextlib.closing(read_records(path, cfg.data.source, validation_cache_dir(cfg))) as records:
        for i, rec in enumerate(records):
            if i == n:
                break
            if not rec.get("image"):
                raise ValueError(f"data.val_path={path}: sample {i} (key {rec.get('key')!r}) holds no image: "
                                 f"super-resolution's evaluation needs the pixels")
            images.append(decode_rgb(rec["image"], cfg.data.resolution))  # (R, R, 3) uint8
    return images


def downsample(images: list[np.ndarray], side: int) -> list[np.ndarray]:
    """(R, R, 3) uint8 -> (side, side, 3) uint8 by area averaging (super-resolution's input)."""
    from data_pipeline.image_ops import area_downsample
    from data_pipeline.shapes import tensor_array_to_image
    x = torch.from_numpy(np.stack([image_to_tensor_array(im) for im in images]))  # (B, 3, R, R)
    return [tensor_array_to_image(low) for low in area_downsample(x, side).numpy()]


def task_inputs(predictor: TaskPredictor, samples: list[dict]) -> list[np.ndarray]:
    """What ``predict`` takes for these samples: the image, area-downsampled for super-resolution."""
    images = [s["image"] for s in samples]
    if predictor.task.name == "super_resolution":
        return downsample(images, predictor.config.task.source_resolution)
    return images


def baseline_outputs(cfg: Config, task_name: str, samples: list[dict]) -> list:
    """The trivial baseline's output for each sample: the bicubic upsampling of its low-res input, the
    training scenes' mean depth map, the most frequent training caption."""
    from trainer.eval import task_metrics
    n = min(cfg.data.num_samples, BASELINE_FIT_SAMPLES)
    if task_name == "super_resolution":
        return task_metrics.bicubic_baseline([s["image"] for s in samples], cfg.task.source_resolution)
    gen = ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "train", cfg.data.seed)
    if task_name == "depth":
        mean = task_metrics.mean_depth_map([gen.sample(i)["depth"] for i in range(n)])
        return [mean] * len(samples)
    return [task_metrics.most_frequent_caption(gen.captions(n))] * len(samples)


def task_scores(task_name: str, outputs: list, samples: list[dict]) -> dict[str, float]:
    """The task's metric of ``outputs`` against the samples' truth."""
    from trainer.eval import task_metrics
    if task_name == "super_resolution":
        return task_metrics.image_metrics(outputs, [s["image"] for s in samples])
    if task_name == "depth":
        return task_metrics.depth_metrics(outputs, [s["depth"] for s in samples])
    return task_metrics.caption_metrics(outputs, [s["scene"] for s in samples])


# ----------------------------------------------------------------------------------------------
# Evaluation


@dataclass
class TaskEvaluation:
    task: str
    num: int
    model: dict[str, float]  # the task's metric of the model's outputs
    baseline: dict[str, float]  # the same metric of the trivial baseline's
    shapes_eval: dict[str, float] = field(default_factory=dict)  # super-resolution: ShapesEval of the outputs
    data: str = "unseen shapes scenes"  # what was scored

    def metrics(self) -> dict[str, float]:
        """``task/<metric>``, ``task/baseline_<metric>`` and ``shapes_eval/<name>``: what training logs."""
        out = {f"task/{k}": float(v) for k, v in self.model.items()}
        out.update({f"task/baseline_{k}": float(v) for k, v in self.baseline.items()})
        out.update({f"shapes_eval/{k}": float(v) for k, v in self.shapes_eval.items()})
        return out

    def to_dict(self) -> dict:
        return {"task": self.task, "num": self.num, "data": self.data, "baseline_name": BASELINE_NAMES[self.task],
                "model": self.model, "baseline": self.baseline, **({"shapes_eval": self.shapes_eval}
                                                                     if self.shapes_eval else {})}

    def table(self) -> str:
        """Model vs baseline, one metric per line (and ShapesEval's overall and tasks for super-resolution)."""
        base = BASELINE_NAMES[self.task]
        width = max(len(k) for k in self.model)
        lines = [f"{self.task} on {self.num} {self.data}",
                 f"{'metric':<{width}} {'model':>10} {base:>22}"]
        lines += [f"{k:<{width}} {v:>10.4f} {self.baseline.get(k, float('nan')):>22.4f}" for k, v in self.model.items()]
        if self.shapes_eval:
            from trainer.eval.shapes_eval import TASKS
            lines.append("ShapesEval of the outputs: " + " ".join(
                f"{k}={self.shapes_eval[k]:.3f}" for k in ("overall",) + TASKS))
        return "\n".join(lines)


def default_eval_size(cfg: Config) -> int:
    """Held-out scenes a task evaluation scores: as many images as training's ShapesEval samples
    (eval.images_per_prompt x the ShapesEval prompt suite of data.max_groups: 60 or 90 prompts)."""
    from trainer.eval.shapes_eval import prompt_suite
    return cfg.eval.images_per_prompt * len(prompt_suite(cfg.data.max_groups))


def evaluate_task(predictor: TaskPredictor, num: int | None = None, seed: int = 0, images: list | None = None,
                  images_from: str = "", split: str = "unseen", **predict_kw) -> TaskEvaluation:
    """Score the predictor on the first ``num`` shapes scenes of ``split`` (``heldout_samples``; default
    ``default_eval_size``)
    against the task's trivial baseline; super-resolution's outputs also go through ShapesEval
    against their true scenes. Super-resolution may score ``images`` instead ((R, R, 3) uint8 ground
    truths, e.g. real photos, named ``images_from``): PSNR and SSIM only."""
    from trainer.eval.shapes_eval import evaluate
    cfg, name = predictor.config, predictor.task.name
    if images is not None and name != "super_resolution":
        raise ValueError(f"only super-resolution scores given images; {name} needs the shapes scenes' truth")
    samples = heldout_samples(cfg, num or default_eval_size(cfg), split) if images is None else \
        [{"image": im} for im in images]
    outputs = predictor.predict(task_inputs(predictor, samples), seed=seed, **predict_kw)
    result = TaskEvaluation(name, len(samples), task_scores(name, outputs, samples),
                            task_scores(name, baseline_outputs(cfg, name, samples), samples),
                            data=f"images from {images_from}" if images is not None else SPLIT_NAMES[split])
    if name == "super_resolution" and images is None:
        result.shapes_eval = evaluate([[im] for im in outputs], [s["scene"] for s in samples]).summary()
    return result


# ----------------------------------------------------------------------------------------------
# Sample grids


GRID_SIDE = 128  # grid pixels per image side: small images are scaled up (nearest) to about this
CAPTION_LABEL_WIDTH = 420  # pixels of the caption column of a captioning grid: three captions fit a row


def depth_image(depth: np.ndarray) -> np.ndarray:
    """Metric depth (H, W) -> (H, W, 3) uint8 gray, linear in log depth (as the model's target): white at
    DEPTH_NEAR, black at DEPTH_FAR, the same scale for every map."""
    from data_pipeline.shapes import DEPTH_FAR, DEPTH_NEAR
    near = np.log(np.clip(depth, DEPTH_NEAR, DEPTH_FAR) / DEPTH_FAR) / np.log(DEPTH_NEAR / DEPTH_FAR)  # (H, W) 0 far, 1 near
    gray = near * 255 + 0.5  # (H, W)
    return np.repeat(gray.astype(np.uint8)[..., None], 3, axis=-1)


def resize_nearest(image: np.ndarray, side: int) -> np.ndarray:
    return image if image.shape[0] == side else np.asarray(Image.fromarray(image).resize((side, side), Image.NEAREST))


def caption_drawing(text: str, side: int) -> np.ndarray:
    """The scene a caption describes, rendered (shapes at their default place); dark gray if it does not parse."""
    from data_pipeline.shapes import parse_caption, render
    scene = parse_caption(text)
    return render(scene, side) if scene is not None else np.full((side, side, 3), 48, np.uint8)


def grid_seeds(predictor: TaskPredictor) -> list[int]:
    """Two seeds where z0 is sampled (the spread of the outputs shows), one where it is not."""
    sampled = predictor.variational and not predictor.config.sample.use_mean
    return [0, 1] if sampled else [0]


def task_grid_title(predictor: TaskPredictor, step: int | None) -> str:
    s, name = predictor.config.sample, predictor.task.name
    if not predictor.variational:
        start = "z0 = bicubic upsample of the input"
    else:
        start = "z0 = mu (VE mean)" if s.use_mean else "z0 = mu + sigma * eps"
    head = f"step {step}: " if step is not None else ""
    return f"{head}{name}, {start}, cfg scale {s.cfg_scale:g}, {s.steps} {s.solver} steps"


def task_grid(predictor: TaskPredictor, samples: list[dict], step: int | None = None) -> Image.Image:
    """One row per sample, labelled: super-resolution: input (scaled up) | bicubic | output | truth;
    depth: input | output per seed | truth (gray: near is white); captioning: the image, then the
    scene each generated caption describes, drawn, with the true and generated captions on the left."""
    name, seeds = predictor.task.name, grid_seeds(predictor)
    inputs = task_inputs(predictor, samples)
    outputs = [predictor.predict(inputs, seed=k) for k in seeds]  # seeds x B
    res = predictor.config.data.resolution
    scale = max(1, GRID_SIDE // res)
    title = task_grid_title(predictor, step)
    labels = [f"seed {k}" for k in seeds]
    if name == "super_resolution":
        bicubic = baseline_outputs(predictor.config, name, samples)
        rows = [[resize_nearest(inputs[i], res), bicubic[i]] + [o[i] for o in outputs] + [s["image"]]
                for i, s in enumerate(samples)]
        columns = [f"input {inputs[0].shape[0]}px", "bicubic"] + (["output"] if len(seeds) == 1 else labels) + ["truth"]
        return labeled_grid(rows, [s["caption"] for s in samples], columns, scale=scale, title=title)
    if name == "depth":
        rows = [[s["image"]] + [depth_image(o[i]) for o in outputs] + [depth_image(s["depth"])]
                for i, s in enumerate(samples)]
        return labeled_grid(rows, [s["caption"] for s in samples], ["input"] + labels + ["truth"], scale=scale,
                            title=title)
    rows = [[s["image"]] + [caption_drawing(o[i], res) for o in outputs] for i, s in enumerate(samples)]
    row_labels = ["\n".join([f"true: {s['caption']}"] + [f"seed {k}: {o[i] or '(empty)'}" for k, o in zip(seeds, outputs)])
                  for i, s in enumerate(samples)]
    return labeled_grid(rows, row_labels, ["image"] + [f"{c} drawn" for c in labels], scale=scale, title=title,
                        label_width=CAPTION_LABEL_WIDTH)
