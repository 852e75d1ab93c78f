"""Map-style datasets yielding the one batch format every source shares.

A sample is a dict:
    ``image``      (3, H, W) float32 in [-1, 1]  — pixel-space target (absent when ``latent`` is given)
    ``latent``     (C, h, w) float32             — precomputed image-autoencoder latent (optional)
    ``text_emb``   (n, d) float32                — frozen language-model token embeddings
    ``text_mask``  (n,) bool                     — True marks a real token, False padding
    ``caption``    str
and ``torch.utils.data.default_collate`` stacks samples into the batch dict the trainer reads.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.features import CaptionCache, TextEncoder
from data_pipeline.shapes import ShapesGenerator, image_to_tensor_array


class ShapesTextDataset(Dataset):
    """``num_samples`` scenes of a :class:`ShapesGenerator`, rendered on the fly, with caption
    embeddings computed once up front (the caption set is small and repeats)."""

    def __init__(self, generator: ShapesGenerator, num_samples: int, encoder: TextEncoder, max_tokens: int):
        self.generator, self.num_samples = generator, num_samples
        self.cache = CaptionCache(encoder, max_tokens, generator.captions(num_samples))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        s = self.generator.sample(index)
        emb, mask = self.cache.lookup(s["caption"])
        return {
            "image": torch.from_numpy(image_to_tensor_array(s["image"])),  # (3, H, W)
            "text_emb": torch.from_numpy(emb.astype(np.float32)),  # (n, d)
            "text_mask": torch.from_numpy(mask.copy()),  # (n,)
            "caption": s["caption"],
        }
