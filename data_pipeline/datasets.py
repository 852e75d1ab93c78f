"""Map-style datasets yielding the one batch format every source shares.

A sample is a dict:
    ``image``      (3, H, W) float32 in [-1, 1]  — pixel-space target (absent when ``latent`` is given)
    ``latent``     (C, h, w) float32             — precomputed image-autoencoder latent (optional)
    ``text_emb``   (n, d) float32                — frozen language-model token embeddings
    ``text_mask``  (n,) bool                     — True marks a real token, False padding
    ``caption``    str
and, where a task asks for them (``extras``):
    ``depth``        (1, H, W) float32 in [-1, 1] — the scene's depth map (``shapes.depth_to_tensor_array``)
    ``caption_ids``  (n,) int64                   — the caption's token ids, as ``text_emb`` tokenized it
``torch.utils.data.default_collate`` stacks samples into the batch dict the trainer reads.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data_pipeline.features import CaptionCache, TextEncoder
from data_pipeline.shapes import ShapesGenerator, depth_to_tensor_array, image_to_tensor_array

EXTRAS = ("depth", "caption_ids")


class ShapesTextDataset(Dataset):
    """``num_samples`` scenes of a :class:`ShapesGenerator`, rendered on the fly, with caption
    embeddings (and, with ``"caption_ids"`` in ``extras``, token ids) computed once up front
    (the caption set is small and repeats). ``extras``: see the module docstring."""

    def __init__(self, generator: ShapesGenerator, num_samples: int, encoder: TextEncoder, max_tokens: int,
                 extras: tuple[str, ...] = ()):
        unknown = sorted(set(extras) - set(EXTRAS))
        if unknown:
            raise ValueError(f"unknown dataset extras {unknown}: expected some of {EXTRAS}")
        self.generator, self.num_samples, self.extras = generator, num_samples, tuple(extras)
        captions = generator.captions(num_samples)
        self.cache = CaptionCache(encoder, max_tokens, captions)
        self._ids: dict[str, np.ndarray] = {}
        if "caption_ids" in self.extras:
            distinct = sorted(set(captions))
            self._ids = dict(zip(distinct, encoder.token_ids(distinct, max_tokens)))  # caption -> (n,)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        s = self.generator.sample(index)
        emb, mask = self.cache.lookup(s["caption"])
        out = {
            "image": torch.from_numpy(image_to_tensor_array(s["image"])),  # (3, H, W)
            "text_emb": torch.from_numpy(emb.astype(np.float32)),  # (n, d)
            "text_mask": torch.from_numpy(mask.copy()),  # (n,)
            "caption": s["caption"],
        }
        if "depth" in self.extras:
            out["depth"] = torch.from_numpy(depth_to_tensor_array(s["depth"]))  # (1, H, W)
        if "caption_ids" in self.extras:
            out["caption_ids"] = torch.from_numpy(self._ids[s["caption"]].copy())  # (n,)
        return out
