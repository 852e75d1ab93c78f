"""The one size registry: ``PRESETS[name]`` gives the architecture of a CrossFlow size.

Parameter counts are of the flow transformer alone (as the paper counts its 0.95B model),
for the paper's latent 4x32x32 (256 px through the SD VAE) with sin-cos position embeddings.
``tests/test_presets.py`` checks each named size within 3% on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    hidden_size: int  # flow transformer width
    depth: int  # flow transformer blocks
    head_dim: int  # 64 or 128
    patch_size: int  # latent pixels per patch side
    text_ve_width: int
    text_ve_depth: int
    text_ve_reduced_width: int  # per-token width after the halving reductions, before flattening
    nominal_params: float | None  # what the name promises (flow transformer), None for tiny


PRESETS: dict[str, Preset] = {
    # A training step well under a second on one CPU core (32x32 pixels, patch 4: 64 tokens).
    "tiny": Preset(128, 4, 64, 4, 128, 2, 32, None),
    "70M": Preset(448, 19, 64, 2, 512, 4, 96, 70e6),
    "150M": Preset(768, 14, 64, 2, 768, 6, 96, 150e6),
    "300M": Preset(1024, 16, 64, 2, 1024, 8, 96, 300e6),
    "500M": Preset(1280, 17, 64, 2, 1024, 11, 96, 500e6),
    "0.95B": Preset(1536, 22, 128, 2, 1024, 11, 96, 0.95e9),
}
