"""From a checkpoint to images: load weights without the training stack, embed prompts,
solve the flow, decode, write grids. Used by ``crossflow sample`` and by training's sample grids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_pipeline.features import CaptionCache, text_encoder_from_config
from trainer.checkpoint import load_features, load_weights, resolve_weights
from trainer.config import Config, config_from_dict
from trainer.model_input import checkpoint_model_input
from trainer.models.codecs import LatentCodec, PixelCodec, build_codec
from trainer.models.crossflow.crossflow import CrossFlow
from trainer.models.families import model_from_args
from trainer.sampling import encode_prompts, interpolate_z0, solve, z0_arithmetic


@dataclass
class Generator:
    """A model ready to sample: weights (EMA), codec (pixels or the autoencoder that decodes the
    model's latents), and a caption-embedding cache."""
    model: CrossFlow
    codec: PixelCodec | LatentCodec
    captions: CaptionCache
    config: Config
    device: torch.device

    @torch.no_grad()
    def latents(self, prompts: list[str], seed: int = 0, steps: int | None = None, solver: str | None = None,
                cfg_scale: float | None = None, use_mean: bool | None = None) -> torch.Tensor:
        s = self.config.sample
        emb, mask = self.captions.encode(prompts)  # (B, n, d), (B, n)
        emb, mask = emb.to(self.device), mask.to(self.device)
        z0 = encode_prompts(self.model, emb, mask, seed, s.use_mean if use_mean is None else use_mean)
        return self.solve(z0, steps, solver, cfg_scale, cond=self.model.text_condition(emb, mask))

    @torch.no_grad()
    def solve(self, z0: torch.Tensor, steps: int | None = None, solver: str | None = None,
              cfg_scale: float | None = None, cond=None) -> torch.Tensor:
        """``cond``: the model's ``text_condition`` of the prompts (None for CrossFlow)."""
        s = self.config.sample
        return solve(self.model, z0, steps or s.steps, solver or s.solver,
                     s.cfg_scale if cfg_scale is None else cfg_scale, cond)

    def images(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents (B, C, h, w) -> (H, W, 3) uint8 images, decoded by the codec."""
        x = self.codec.decode(latents.to(self.device)).float().cpu()  # (B, 3, H, W) in [-1, 1]
        x = ((x + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return list(x)

    def generate(self, prompts: list[str], seed: int = 0, **kw) -> list[np.ndarray]:
        return self.images(self.latents(prompts, seed, **kw))

    @torch.no_grad()
    def z0(self, prompts: list[str], seed: int = 0) -> torch.Tensor:
        if not self.model.source_from_text:
            raise ValueError(f"z0 interpolation and arithmetic need a text-derived z0 (model.family crossflow); "
                             f"this {type(self.model).__name__} starts from noise")
        emb, mask = self.captions.encode(prompts)
        return encode_prompts(self.model, emb.to(self.device), mask.to(self.device), seed, self.config.sample.use_mean)

    def interpolation(self, a: str, b: str, num: int, seed: int = 0, **kw) -> list[np.ndarray]:
        """``num`` images along the straight line from prompt a's z0 to prompt b's (the paper's Figure 4)."""
        z = self.z0([a, b], seed)
        return self.images(self.solve(interpolate_z0(z[0], z[1], num), **kw))

    def arithmetic(self, terms: list[tuple[float, str]], seed: int = 0, **kw) -> list[np.ndarray]:
        """Images of each operand and of their signed sum in z0 space, re-standardized (Figure 5)."""
        z = self.z0([p for _, p in terms], seed)  # (K, C, H, W)
        combined = z0_arithmetic([(sign, z[i]) for i, (sign, _) in enumerate(terms)])
        return self.images(self.solve(torch.cat([z, combined[None]]), **kw))


def load_generator(checkpoint: str | Path, device: str | torch.device = "cpu",
                   text_encoder: str | None = None, vae: str | None = None) -> Generator:
    """From an export (.safetensors), a checkpoint directory, or a run directory (its latest):
    EMA weights, model args, config and the autoencoder its feature metadata names (``vae``, a local
    AutoencoderKL folder, replaces it); no DeepSpeed needed."""
    path = resolve_weights(checkpoint)
    state, args, config = load_weights(path)
    cfg = config_from_dict(config)
    device = torch.device(device)
    codec = build_codec(checkpoint_model_input(cfg, args, load_features(path)), vae or "", device)
    model = model_from_args(args)  # the class its model.family names
    model.load_state_dict(state)
    model.to(device).eval()
    encoder = text_encoder_from_config(cfg.data, spec=text_encoder)
    return Generator(model, codec, CaptionCache(encoder, cfg.data.max_tokens), cfg, device)


def image_grid(rows: list[list[np.ndarray]], scale: int = 1, pad: int = 2) -> Image.Image:
    """Rows of equally sized (H, W, 3) uint8 images -> one PIL image with a gray border."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3), 64, dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = img
    out = Image.fromarray(canvas)
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out
