"""Metrics of the image-to-X tasks (super-resolution, depth, captioning) and the trivial baselines
each task must beat. Numpy in, floats out; torchmetrics computes PSNR, SSIM and BLEU-4.

- ``image_metrics``: PSNR (dB) and SSIM on uint8 RGB images, both with data range 255 (the
  images as stored, [0, 255]); PSNR per image, capped at ``PSNR_CAP_DB`` (an exact image has
  infinite PSNR), then averaged; SSIM with torchmetrics' defaults (11 px Gaussian, sigma 1.5).
- ``depth_metrics``: AbsRel = mean |p - g| / g and delta1 = fraction of pixels with
  max(p / g, g / p) < 1.25, over every pixel of every map (metric depth in meters).
- ``caption_metrics``: each generated caption is parsed back into a scene (``parse_caption``)
  and compared with the true scene group by group; BLEU-4 against every phrasing of the true
  scene (see the function).
- baselines: ``bicubic_baseline`` (area-downsampled then bicubic-upsampled, the same resampling
  as the super-resolution source), ``mean_depth_map``, ``most_frequent_caption``.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from data_pipeline.shapes import Scene, ShapeGroup, parse_caption, phrasings
from trainer.tasks import upsampled_source

PSNR_CAP_DB = 100.0  # what one image identical to its ground truth counts for (its PSNR is infinite)
DELTA1_THRESHOLD = 1.25
CAPTION_ATTRIBUTES = ("object", "count", "color", "position", "size")


def _image_batch(images: list[np.ndarray], what: str) -> torch.Tensor:
    """A list of (H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 255]."""
    if not len(images):
        raise ValueError(f"{what}: no images")
    for i, image in enumerate(images):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{what}[{i}]: expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"{what}: images of different sizes {sorted(shapes)}")
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()  # (B, 3, H, W)


def image_metrics(pred: list[np.ndarray], truth: list[np.ndarray]) -> dict[str, float]:
    """{"psnr": dB, "ssim": [-1, 1]}, means over the images, of uint8 (H, W, 3) predictions
    against their ground truth."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
    p, t = _image_batch(pred, "pred"), _image_batch(truth, "truth")  # (B, 3, H, W)
    if p.shape != t.shape:
        raise ValueError(f"pred {tuple(p.shape)} and truth {tuple(t.shape)} differ in number or size of images")
    psnr = peak_signal_noise_ratio(p, t, data_range=255.0, reduction="none", dim=(1, 2, 3))  # (B,)
    ssim = structural_similarity_index_measure(p, t, data_range=255.0)
    return {"psnr": float(psnr.clamp(max=PSNR_CAP_DB).mean()), "ssim": float(ssim)}


def _depth_stack(depths: list[np.ndarray], what: str) -> np.ndarray:
    if not len(depths):
        raise ValueError(f"{what}: no depth maps")
    shapes = {np.shape(d) for d in depths}
    if len(shapes) > 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"{what}: expected (H, W) depth maps of one size, got shapes {sorted(shapes)}")
    stack = np.stack([np.asarray(d, dtype=np.float64) for d in depths])  # (B, H, W)
    if not np.all(stack > 0):
        raise ValueError(f"{what}: depths must be positive meters (min {stack.min()})")
    return stack


def depth_metrics(pred: list[np.ndarray], truth: list[np.ndarray]) -> dict[str, float]:
    """{"abs_rel", "delta1"} of (H, W) predicted depth maps in meters against the true ones."""
    p, g = _depth_stack(pred, "pred"), _depth_stack(truth, "truth")  # (B, H, W)
    if p.shape != g.shape:
        raise ValueError(f"pred {p.shape} and truth {g.shape} differ in number or size of depth maps")
    ratio = np.maximum(p / g, g / p)  # (B, H, W)
    return {"abs_rel": float(np.mean(np.abs(p - g) / g)), "delta1": float(np.mean(ratio < DELTA1_THRESHOLD))}


def _matching_group(true: ShapeGroup, index: int, predicted: tuple[ShapeGroup, ...]) -> ShapeGroup | None:
    """The predicted group ``true`` is compared with: the one at the same position, else the one in
    the same place in the caption, else none."""
    same_position = [g for g in predicted if g.position == true.position]
    if same_position:
        return same_position[0]
    return predicted[index] if index < len(predicted) else None


def _group_scores(true: ShapeGroup, guess: ShapeGroup | None) -> dict[str, bool]:
    if guess is None:
        return dict.fromkeys(CAPTION_ATTRIBUTES, False)
    return {"object": (guess.shape, guess.color) == (true.shape, true.color), "count": guess.count == true.count,
            "color": guess.color == true.color, "position": guess.position == true.position,
            "size": guess.size == true.size}


def caption_metrics(generated: list[str], scenes: list[Scene]) -> dict[str, float]:
    """Generated captions against the true scenes.

    ``object`` (shape and color), ``count``, ``color``, ``position``, ``size``: the fraction of true
    groups (over all scenes) whose attribute the caption got right, each true group compared with
    the generated group at its position (else the one in its place in the caption); a caption that
    does not parse gets every attribute wrong. ``overall``: the fraction of captions that describe
    exactly the true scene (same groups, any order). ``parsed``: the fraction that parse.
    ``bleu4``: corpus BLEU-4 (torchmetrics, no smoothing) of the lowercased captions against every
    phrasing of the true scene (``shapes.phrasings``)."""
    from torchmetrics.functional.text import bleu_score
    if len(generated) != len(scenes):
        raise ValueError(f"{len(generated)} generated captions for {len(scenes)} scenes")
    if not generated:
        raise ValueError("caption_metrics: no captions")
    right = dict.fromkeys(CAPTION_ATTRIBUTES, 0)
    groups = overall = parsed = 0
    for text, scene in zip(generated, scenes):
        guess = parse_caption(text)
        parsed += guess is not None
        overall += guess is not None and sorted(map(repr, guess.groups)) == sorted(map(repr, scene.groups))
        for i, true in enumerate(scene.groups):
            scores = _group_scores(true, _matching_group(true, i, guess.groups) if guess else None)
            for name in CAPTION_ATTRIBUTES:
                right[name] += scores[name]
            groups += 1
    preds = [" ".join(text.lower().split()) for text in generated]
    bleu = bleu_score(preds, [phrasings(scene) for scene in scenes], n_gram=4)
    n = len(generated)
    return {"bleu4": float(bleu), **{name: right[name] / groups for name in CAPTION_ATTRIBUTES},
            "overall": overall / n, "parsed": parsed / n}


# ----------------------------------------------------------------------------------- baselines

def bicubic_baseline(images: list[np.ndarray], source_resolution: int) -> list[np.ndarray]:
    """Super-resolution's baseline: each (H, W, 3) uint8 image area-downsampled to
    ``source_resolution`` (what the model is given) and bicubic-upsampled back to (H, W, 3) uint8."""
    batch = _image_batch(images, "images") / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
    side = batch.shape[-1]
    if batch.shape[-2] != side or side % source_resolution:
        raise ValueError(f"bicubic_baseline: source_resolution {source_resolution} must divide the side of "
                         f"square images, got {tuple(batch.shape[-2:])}")
    up = upsampled_source(batch, source_resolution)  # (B, 3, H, W): what training's z0 is
    pixels = ((up + 1.0) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)  # (B, H, W, 3)
    return list(pixels.numpy())


def mean_depth_map(depths: list[np.ndarray]) -> np.ndarray:
    """Depth's baseline: the per-pixel mean of (H, W) depth maps (the training scenes'), float32."""
    return _depth_stack(depths, "depths").mean(axis=0).astype(np.float32)  # (H, W)


def most_frequent_caption(captions: list[str]) -> str:
    """Captioning's baseline: the caption seen most often (the training scenes'); ties go to the
    one seen first."""
    if not captions:
        raise ValueError("most_frequent_caption: no captions")
    return Counter(captions).most_common(1)[0][0]
