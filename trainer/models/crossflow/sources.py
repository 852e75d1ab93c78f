"""Sources of the flow besides the Text VE: what makes z0 from an image (``task.source``).

``ImageVE`` (image_ve): a variational image encoder, image (B, 3, H, W) in [-1, 1] -> a Gaussian
over the flow's latent (C, h, w), as the paper's image VE for depth and captioning (its code was
never released; this is ours). A conv stem at the input resolution, stride-2 stages down to
(h, w) (H / h must be a power of 2: 1 for depth, 4 for 32 px -> the 8x8 caption latent), a conv
at the latent's resolution and a conv head to 2C channels (mu, logvar). Convolutions see only a
neighbourhood, so a global branch (features mean-pooled over the image -> MLP -> a full
(2C, h, w) map, added to the head's output) lets the latent carry facts about the whole scene
(how many shapes, which ones): the caption decoder reads them from z0's flow.

The upsample source (super-resolution) has no module: trainer/tasks.py prepares z0 in the flow's
space (the bicubic-upsampled low-res image, through the codec) and ``CrossFlow.encode_source``
passes it on.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

# The logvar outputs start at exactly this (their weights start at zero): sigma = 1, the prior's,
# so the KL's variance term starts at 0 and z0 starts as the Text VE's does on average (mu small,
# unit noise); the flow loss then shrinks sigma where the image must show through.
INIT_LOGVAR = 0.0


def downsampling_stages(image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int]) -> int:
    """How many stride-2 stages take the image's (H, W) to the latent's (h, w): log2(H / h),
    refused unless both sides shrink by the same power of 2."""
    _, H, W = image_shape
    _, h, w = latent_shape
    factor = H // h if h and H % h == 0 else 0
    if factor < 1 or factor & (factor - 1) or W != w * factor:
        raise ValueError(f"image VE: the image {tuple(image_shape)} must shrink to the latent {tuple(latent_shape)} "
                         f"by a power of 2 on both sides (H / h = W / w = 1, 2, 4, ...)")
    return int(math.log2(factor))


def conv_norm_act(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(math.gcd(8, cout), cout), nn.SiLU())


class ImageVE(nn.Module):
    """image (B, 3, H, W) in [-1, 1] -> mu, logvar, each (B, C, h, w) (see the module docstring).
    ``width``: channels at the input resolution, doubled by each stride-2 stage up to 4 x width."""

    def __init__(self, image_shape: tuple[int, int, int], latent_shape: tuple[int, int, int], width: int = 32):
        super().__init__()
        self.image_shape, self.latent_shape = tuple(image_shape), tuple(latent_shape)
        stages = downsampling_stages(self.image_shape, self.latent_shape)
        C = latent_shape[0]
        self.stem = conv_norm_act(image_shape[0], width)
        down, c = [], width
        for _ in range(stages):
            down.append(conv_norm_act(c, min(2 * c, 4 * width), stride=2))
            c = min(2 * c, 4 * width)
        self.down = nn.Sequential(*down)
        self.mix = conv_norm_act(c, c)  # at the latent's resolution: the features the head reads
        self.head = nn.Conv2d(c, 2 * C, 3, padding=1)  # (mu, logvar) per latent pixel
        self.global_mlp = nn.Sequential(nn.Linear(c, c), nn.SiLU(), nn.Linear(c, 2 * math.prod(latent_shape)))
        self._initialize()

    def _initialize(self) -> None:
        """The global branch starts at zero (the head alone at first); logvar starts at INIT_LOGVAR."""
        C = self.latent_shape[0]
        nn.init.zeros_(self.global_mlp[-1].weight)
        nn.init.zeros_(self.global_mlp[-1].bias)
        nn.init.zeros_(self.head.weight[C:])
        nn.init.constant_(self.head.bias[C:], INIT_LOGVAR)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, 3, H, W) in [-1, 1] -> mu, logvar, each (B, C, h, w)."""
        if tuple(image.shape[1:]) != self.image_shape:
            raise ValueError(f"image VE built for images {self.image_shape}, got {tuple(image.shape[1:])}")
        x = self.mix(self.down(self.stem(image)))  # (B, c, h, w)
        local = self.head(x)  # (B, 2C, h, w)
        scene = self.global_mlp(x.mean(dim=(2, 3))).view_as(local)  # (B, 2C, h, w): facts about the whole image
        mu, logvar = (local + scene).chunk(2, dim=1)  # (B, C, h, w) each
        return mu, logvar
