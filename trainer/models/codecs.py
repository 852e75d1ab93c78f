"""Image codecs: what the flow's target z1 is, and how every image the project writes is made from it.

``PixelCodec`` trains on the image itself (tiny images, the shapes demo). ``LatentCodec`` wraps a
diffusers AutoencoderKL loaded from a local folder (the paper's SD-VAE setting): its latents are
``z = (posterior_mean - shift_factor) * scaling_factor`` as the shards' ``LatentSpec`` records, and
``decode`` undoes exactly that. ``build_codec`` picks one for a resolved ``ModelInput``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from data_pipeline.features import require_autoencoder_folder
from data_pipeline.metadata import LatentSpec


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


# ----------------------------------------------------------------------------- autoencoder folders
def autoencoder_config(folder: str | Path, what: str = "autoencoder") -> dict:
    """The config.json of a local diffusers AutoencoderKL folder; a clear error when it is missing."""
    return require_autoencoder_folder(folder, what)


def autoencoder_downsample(config: dict) -> int:
    """Image pixels per latent pixel: one 2x downsampling between consecutive encoder blocks."""
    return 2 ** (len(config.get("block_out_channels", (0,))) - 1)


def _scale_and_shift(config: dict) -> tuple[float, float]:
    return float(config.get("scaling_factor") or 1.0), float(config.get("shift_factor") or 0.0)


def spec_from_autoencoder(folder: str, latent_shape: tuple[int, int, int]) -> LatentSpec:
    """A LatentSpec for latents of ``latent_shape`` made by ``folder`` with its own scale and shift
    (shards or checkpoints that record none)."""
    config = autoencoder_config(folder)
    scale, shift = _scale_and_shift(config)
    c, h, w = latent_shape
    spec = LatentSpec(str(folder), scale, shift, h * autoencoder_downsample(config), (c, h, w))
    check_autoencoder(folder, config, spec, "the latents")
    return spec


def check_autoencoder(folder: str, config: dict, spec: LatentSpec, where: str) -> None:
    """``folder``'s autoencoder must be able to decode latents made as ``spec`` says (channels,
    downsampling); the error names both values."""
    c, h, _ = spec.latent_shape
    if int(config.get("latent_channels", c)) != c:
        raise ValueError(f"autoencoder {folder} has {config.get('latent_channels')} latent channels but {where} "
                         f"have {c} ({spec.latent_shape})")
    factor = autoencoder_downsample(config)
    if h * factor != spec.resolution:
        raise ValueError(f"autoencoder {folder} downsamples {factor}x, so {h}x{h} latents decode to {h * factor} px, "
                         f"but {where} were made from {spec.resolution} px images")


def override_autoencoder(spec: LatentSpec, folder: str, what: str) -> LatentSpec:
    """``spec`` decoded by another folder (``data.vae``, ``--vae``): an autoencoder that can decode the
    latents (channels, downsampling) and, when the folder that made them is readable here, the same
    kind (its config's scaling and shift factor; the applied ones may differ, ``data features
    --scaling-factor``). Mismatches fail naming both values. Decoding uses ``spec``'s factors."""
    config = autoencoder_config(folder, what)
    check_autoencoder(folder, config, spec, f"the latents (made by {spec.autoencoder})")
    if (Path(spec.autoencoder) / "config.json").is_file():
        made_by = _scale_and_shift(autoencoder_config(spec.autoencoder))
        if _scale_and_shift(config) != made_by:
            (scale, shift), (made_scale, made_shift) = _scale_and_shift(config), made_by
            raise ValueError(f"{what}={folder} has scaling_factor={scale}, shift_factor={shift} but the latents' "
                             f"autoencoder {spec.autoencoder} has scaling_factor={made_scale}, shift_factor="
                             f"{made_shift}: a different autoencoder would decode them wrongly")
    return dataclasses.replace(spec, autoencoder=str(folder))


# ----------------------------------------------------------------------------- latent codec
class LatentCodec:
    """A diffusers AutoencoderKL from a local folder: image (B, 3, H, W) in [-1, 1] <-> z (B, C, h, w),
    z = (posterior_mean - shift) * scale as ``spec`` records. Batched, no grad, on ``device``."""

    name = "latent"

    def __init__(self, spec: LatentSpec, device: str | torch.device = "cpu", batch_size: int = 16):
        from diffusers import AutoencoderKL
        config = autoencoder_config(spec.autoencoder)
        check_autoencoder(spec.autoencoder, config, spec, "the latents")
        self.spec, self.device, self.batch_size = spec, torch.device(device), batch_size
        vae = AutoencoderKL.from_pretrained(spec.autoencoder, local_files_only=True, low_cpu_mem_usage=False)
        self.vae = vae.eval().to(self.device)
        self.vae.requires_grad_(False)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.spec.latent_shape)

    @property
    def resolution(self) -> int:
        return self.spec.resolution

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, h, w): the scaled, shifted posterior mean (deterministic)."""
        out = []
        for x in image.split(self.batch_size):
            mean = self.vae.encode(x.to(self.device, torch.float32)).latent_dist.mean  # (b, C, h, w)
            out.append((mean - self.spec.shift_factor) * self.spec.scaling_factor)
        return torch.cat(out).to(image.device)  # (B, C, h, w)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        out = []
        for zb in z.split(self.batch_size):
            zb = zb.to(self.device, torch.float32) / self.spec.scaling_factor + self.spec.shift_factor  # (b, C, h, w)
            out.append(self.vae.decode(zb).sample.clamp(-1.0, 1.0))  # (b, 3, H, W)
        return torch.cat(out).to(z.device)


def codec_spec(model_input, vae: str = "") -> LatentSpec | None:
    """The LatentSpec that decodes ``model_input`` (None in pixel space), its autoencoder folder
    checked (``vae`` replaces it) but no weights loaded."""
    if model_input.space == "pixels":
        return None
    spec = model_input.latent
    if spec is None:
        if not vae:
            raise ValueError(f"the model works on {model_input.latent_shape} autoencoder latents but nothing names "
                             f"the autoencoder that decodes them: pass --vae FOLDER (or data.vae=FOLDER in training)")
        spec = spec_from_autoencoder(vae, model_input.latent_shape)
    elif vae and str(Path(vae)) != str(Path(spec.autoencoder)):
        spec = override_autoencoder(spec, vae, "--vae")
    if tuple(spec.latent_shape) != tuple(model_input.latent_shape):
        raise ValueError(f"the model works on {tuple(model_input.latent_shape)} latents but its autoencoder "
                         f"spec says {tuple(spec.latent_shape)}")
    check_autoencoder(spec.autoencoder, autoencoder_config(spec.autoencoder), spec, "the latents")
    return spec


def build_codec(model_input, vae: str = "", device: str | torch.device = "cpu") -> PixelCodec | LatentCodec:
    """The codec of a resolved ``trainer.model_input.ModelInput``: pixels, or the autoencoder its
    ``latent`` spec names; ``vae`` (``--vae``) replaces that folder with a compatible one."""
    spec = codec_spec(model_input, vae)
    return PixelCodec(model_input.resolution) if spec is None else LatentCodec(spec, device)


def batch_target(batch: dict, codec) -> torch.Tensor:
    """z1 for a batch: its precomputed ``latent`` if present, else the codec's encoding of ``image``."""
    if "latent" in batch:
        return batch["latent"]
    return codec.encode(batch["image"])
