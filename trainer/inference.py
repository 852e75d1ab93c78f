"""From a checkpoint to images: load weights without the training stack, embed prompts,
solve the flow, decode, write grids. Used by ``crossflow sample`` and by training's sample grids."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from data_pipeline.features import CaptionCache, text_encoder_from_config
from trainer.checkpoint import load_features, load_weights, resolve_weights
from trainer.config import Config, config_from_dict
from trainer.model_input import ModelInput, checkpoint_model_input
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
        return decode_images(self.codec, latents.to(self.device))

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


def decode_images(codec, latents: torch.Tensor) -> list[np.ndarray]:
    """Latents (B, C, h, w) -> (H, W, 3) uint8 images, decoded by ``codec`` (pixels or an autoencoder)."""
    x = codec.decode(latents).float().cpu()  # (B, 3, H, W) in [-1, 1]
    return list(((x + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())


def load_generator(checkpoint: str | Path, device: str | torch.device = "cpu",
                   text_encoder: str | None = None, vae: str | None = None,
                   use_mean: bool | None = None) -> Generator:
    """From an export (.safetensors), a checkpoint directory, or a run directory (its latest):
    EMA weights, model args, config and the autoencoder its feature metadata names (``vae``, a local
    AutoencoderKL folder, replaces it); no DeepSpeed needed. ``use_mean`` replaces the config's
    ``sample.use_mean`` (z0 from the Text VE's mean, or sampled)."""
    from trainer.tasks import task_of
    loaded = load_checkpoint_model(checkpoint, device)
    cfg = loaded.config
    if task_of(cfg).name != "text_to_image":
        raise ValueError(f"{checkpoint} is a checkpoint of {task_of(cfg).name} (task.source={cfg.task.source}, "
                         f"task.target={cfg.task.target}), not of text-to-image: use crossflow eval or caption")
    if use_mean is not None:
        cfg.sample.use_mean = use_mean
    codec = build_codec(loaded.model_input, vae or "", loaded.device)
    encoder = text_encoder_from_config(cfg.data, spec=text_encoder)
    return Generator(loaded.model, codec, CaptionCache(encoder, cfg.data.max_tokens), cfg, loaded.device)


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model in eval mode on ``device``, with the config and model input it was trained on."""
    model: torch.nn.Module
    config: Config
    model_input: ModelInput
    device: torch.device


def load_checkpoint_model(checkpoint: str | Path, device: str | torch.device = "cpu",
                          use_ema: bool = True) -> LoadedCheckpoint:
    """The weights (EMA unless ``use_ema=False``: an export's live weights), model args, config and
    feature metadata of an export, a checkpoint directory or a run directory (its latest); no
    DeepSpeed. What every command on a trained model starts from (``load_generator``,
    ``trainer.task_inference.load_task_predictor``)."""
    path = resolve_weights(checkpoint)
    state, args, config = load_weights(path, ema=use_ema)
    cfg = config_from_dict(config)
    device = torch.device(device)
    model = model_from_args(args)  # the class its model.family names
    model.load_state_dict(state)
    model.to(device).eval()
    return LoadedCheckpoint(model, cfg, checkpoint_model_input(cfg, args, load_features(path)), device)


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


LABEL_FONT_SIZE = 14  # pixels; PIL's bundled default font (no font files, nothing downloaded)
LABEL_WIDTH = 200  # pixels of the prompt column on the left of a labeled grid
LABEL_LINE = LABEL_FONT_SIZE + 4  # pixels per line of label text


def labeled_grid_size(num_rows: int, num_cols: int, side: int, scale: int = 1, pad: int = 2,
                      titled: bool = True, label_width: int = LABEL_WIDTH) -> tuple[int, int]:
    """(width, height) of ``labeled_grid``'s image for square ``side``-pixel images."""
    header = LABEL_LINE * (2 if titled else 1) + 4
    return (label_width + (num_cols * (side + pad) + pad) * scale, header + (num_rows * (side + pad) + pad) * scale)


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines no wider than ``width`` pixels (a longer word keeps its own
    line); a newline in ``text`` starts a new line."""
    if "\n" in text:
        return [line for paragraph in text.split("\n") for line in wrap_text(paragraph, font, width)]
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def labeled_grid(rows: list[list[np.ndarray]], row_labels: list[str], column_labels: list[str],
                 scale: int = 1, pad: int = 2, title: str = "", label_width: int = LABEL_WIDTH) -> Image.Image:
    """``image_grid(rows)`` with each row's label (a prompt, word-wrapped) in a column ``label_width``
    pixels wide on its left, each column's label above it and an optional title line on top: black
    text on white."""
    if len(row_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    h, w = rows[0][0].shape[:2]
    grid = image_grid(rows, scale, pad)
    width, height = labeled_grid_size(len(rows), max(len(r) for r in rows), w, scale, pad, bool(title), label_width)
    header = height - grid.height
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(grid, (label_width, header))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(LABEL_FONT_SIZE)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0), font=font)
    for j, label in enumerate(column_labels):
        x = label_width + (pad + j * (w + pad)) * scale
        draw.text((x, header - LABEL_LINE), label, fill=(0, 0, 0), font=font)
    for i, label in enumerate(row_labels):
        y = header + (pad + i * (h + pad)) * scale
        for k, line in enumerate(wrap_text(label, font, label_width - 8)):
            draw.text((4, y + k * LABEL_LINE), line, fill=(0, 0, 0), font=font)
    return canvas
