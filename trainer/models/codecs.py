"""Image codecs: what the flow's target z1 is. The default trains in pixel space (tiny images);
a diffusers AutoencoderKL latent codec plugs in through the same interface."""
from __future__ import annotations

import torch


class PixelCodec:
    """Identity: z1 is the image itself, (3, H, W) in [-1, 1]."""

    name = "pixels"

    def __init__(self, resolution: int):
        self.resolution = resolution

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (3, self.resolution, self.resolution)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent -> image in [-1, 1]."""
        return z.clamp(-1.0, 1.0)


def batch_target(batch: dict, codec) -> torch.Tensor:
    """z1 for a batch: its precomputed ``latent`` if present, else the codec's encoding of ``image``."""
    if "latent" in batch:
        return batch["latent"]
    return codec.encode(batch["image"])
