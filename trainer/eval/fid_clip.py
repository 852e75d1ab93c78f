"""FID and CLIP score with weights read from local paths only (never a download).

Both wrap torchmetrics, so the numbers are the ones the field reports:

- ``fid_score`` uses torchmetrics' ``FrechetInceptionDistance`` with torch-fidelity's
  InceptionV3 (the TF-ported "pt_inception-2015-12-05" network every FID paper uses). The weights
  file is the torch-fidelity state dict ``weights-inception-2015-12-05-6726825d.pth``; copy it
  onto the machine and pass its path.
- ``clip_score`` uses torchmetrics' ``CLIPScore`` on a local Hugging Face CLIP directory (one
  with ``config.json``, the weights and the processor files, as ``save_pretrained`` writes them),
  loaded with ``local_files_only=True``. The result is the mean cosine similarity clipped at 0
  (torchmetrics' number / 100): the scale of the paper's "CLIP 0.29".

Images are (N, H, W, 3) uint8 arrays (or sequences of (H, W, 3) uint8 arrays), as the sampler
and ``data_pipeline.shapes`` produce them.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch


def _require_path(path: str | os.PathLike | None, what: str, hint: str) -> str:
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found at {str(path)!r}: {hint} (crossflow never downloads weights)")
    return str(path)


def _as_uint8_batch(images: np.ndarray | Sequence[np.ndarray], name: str) -> torch.Tensor:
    """(N, H, W, 3) uint8 (array or sequence of (H, W, 3)) -> (N, 3, H, W) uint8 tensor."""
    arr = np.stack([np.asarray(im) for im in images]) if not isinstance(images, np.ndarray) else images
    if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{name}: expected (N, H, W, 3) uint8 images, got shape {arr.shape} dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)  # (N, 3, H, W)


def fid_score(generated_images: np.ndarray | Sequence[np.ndarray], reference_images: np.ndarray | Sequence[np.ndarray],
              inception_path: str | os.PathLike, feature_dim: int = 2048, batch_size: int = 64,
              device: str | torch.device = "cpu") -> float:
    """Frechet Inception Distance between two image sets (at least 2 images each).

    Args:
        inception_path: torch-fidelity InceptionV3 state dict (weights-inception-2015-12-05-6726825d.pth).
        feature_dim: Inception layer to compare: 2048 (standard FID), 768, 192 or 64.
        batch_size: images per Inception forward (they are resized to 299 x 299).
    """
    path = _require_path(inception_path, "Inception weights",
                         "pass the torch-fidelity file weights-inception-2015-12-05-6726825d.pth")
    from torchmetrics.image.fid import FrechetInceptionDistance

    fake, real = _as_uint8_batch(generated_images, "generated_images"), _as_uint8_batch(reference_images, "reference_images")
    if len(fake) < 2 or len(real) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(fake)} generated and {len(real)} reference")
    metric = FrechetInceptionDistance(feature=feature_dim, feature_extractor_weights_path=path).to(device)
    with torch.no_grad():
        for images, is_real in ((real, True), (fake, False)):
            for chunk in images.split(batch_size):
                metric.update(chunk.to(device), real=is_real)
        return float(metric.compute())


def load_clip(clip_path: str | os.PathLike):
    """(CLIPModel, CLIPProcessor) from a local directory, never from the network."""
    path = _require_path(clip_path, "CLIP model directory",
                         "pass a directory written by CLIPModel/CLIPProcessor.save_pretrained")
    from transformers import CLIPModel, CLIPProcessor

    for needed in ("config.json", "preprocessor_config.json"):
        _require_path(os.path.join(path, needed), f"CLIP {needed}", "save the model and its processor to that directory")
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def clip_score(images: np.ndarray | Sequence[np.ndarray], prompts: Sequence[str], clip_path: str | os.PathLike,
               batch_size: int = 64, device: str | torch.device = "cpu") -> float:
    """Mean over image-prompt pairs of max(cos(image embedding, prompt embedding), 0), in [0, 1]."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    batch = _as_uint8_batch(images, "images")
    if len(batch) != len(prompts):
        raise ValueError(f"{len(batch)} images for {len(prompts)} prompts")
    model, processor = load_clip(clip_path)
    metric = CLIPScore(model_name_or_path=lambda: (model, processor)).to(device)
    with torch.no_grad():
        for start in range(0, len(batch), batch_size):
            chunk = batch[start:start + batch_size].to(device)
            metric.update(list(chunk), list(prompts[start:start + batch_size]))
        return float(metric.compute()) / 100.0
