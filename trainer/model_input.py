"""The one place that decides what the model is built for: the target's shape (pixels or an
autoencoder latent), the text features' width and token count.

The training loop, inference, ``crossflow plan``, the meta-device builds of shipped configs and
the sweep analysis all call it. ``declared_model_input(cfg)`` needs neither shards nor weights
(it is what a config *says*); ``resolve_model_input(cfg, shards=..., metadata=..., encoder_dim=...)``
checks that against what the data *is* and fails naming both values when they disagree.

Checkpoints: ``resolved_config`` writes what training resolved into the config it saves;
``checkpoint_model_input`` / ``saved_model_input`` read a checkpoint's input back (sampling builds
its codec from it); ``check_same_latents`` refuses resuming or initializing from other latents.
"""
from __future__ import annotations

from dataclasses import dataclass

from data_pipeline.features import text_encoder_dim
from data_pipeline.metadata import FeatureMetadata, LatentSpec, TextSpec, check_text_settings
from trainer.config import TASK_PAIRS

@dataclass(frozen=True)
class ModelInput:
    space: str  # "pixels" or "latent"
    latent_shape: tuple[int, int, int]  # z1: (C, h, w); (3, H, W) in pixel space
    text_dim: int  # d of the text token embeddings
    max_tokens: int  # n: tokens per caption, fixed (the Text VE flattens them)
    resolution: int  # image side in pixels (what samples decode to)
    latent: LatentSpec | None = None  # how the latents were made (latent space, when known)
    task: str = "text_to_image"  # the task (trainer.tasks); latent_shape is then the flow's shape (its target's)

    def image_tokens(self, patch_size: int) -> int:
        """Image tokens of the flow transformer for a patch size p: (h/p)*(w/p) (plus one indicator token)."""
        _, h, w = self.latent_shape
        return (h // patch_size) * (w // patch_size)


def _space(cfg, shards: dict | None) -> str:
    if cfg.data.space != "auto":
        return cfg.data.space
    if cfg.data.source == "shapes":
        return "pixels"
    return "latent" if shards and shards.get("latent") else "pixels"


def declared_shape(d, space: str) -> tuple[int, int, int]:
    """z1's shape as the DataConfig ``d`` declares it: (latent_channels, R/f, R/f) or (3, R, R)."""
    if space == "pixels":
        return (3, d.resolution, d.resolution)
    if d.resolution % d.latent_downsample:
        raise ValueError(f"data.resolution={d.resolution} is not a multiple of data.latent_downsample="
                         f"{d.latent_downsample}")
    side = d.resolution // d.latent_downsample
    return (d.latent_channels, side, side)


def declared_model_input(cfg, encoder_dim: int | None = None) -> ModelInput:
    """What the config says, with no shards read and no weights loaded. ``data.space=auto`` reads
    as pixels for shapes and as latent for shard sources (the paper's setting)."""
    d = cfg.data
    space = d.space if d.space != "auto" else ("pixels" if d.source == "shapes" else "latent")
    shape = declared_shape(d, space)
    text_dim = d.text_dim or encoder_dim or text_encoder_dim(d.text_encoder)
    if not text_dim:
        raise ValueError(f"the width of data.text_encoder={d.text_encoder!r} is not known without loading it: "
                         f"set data.text_dim (768 for CLIP ViT-L/14, 4096 for T5-XXL)")
    return ModelInput(space, shape, int(text_dim), d.max_tokens, d.resolution)


def resolve_model_input(cfg, shards: dict | None = None, metadata: FeatureMetadata | None = None,
                        encoder_dim: int | None = None) -> ModelInput:
    """The model input for training on ``cfg``'s data. ``shards``: ``describe_shards`` of
    data.path (None for the shapes generator); ``metadata``: the shards' feature metadata;
    ``encoder_dim``: the width of data.text_encoder when it was loaded. Every value stated twice
    (config, shards, metadata, encoder, data.vae's autoencoder) must agree; the error names both."""
    d = cfg.data
    space = _space(cfg, shards)
    where = f"shards at {d.path}" if shards is not None else "the data"
    if getattr(cfg, "task", None) is not None and cfg.task.source == "upsample" and shards is not None:
        _check_upsample_shards(shards, where)
        if space == "latent" and not d.vae:
            raise ValueError(f"super-resolution in latent space on {where} encodes their images (z1) and their "
                             f"upsampled low-res versions (z0) on the fly: set data.vae=<AutoencoderKL folder>")
    elif space == "latent" and shards is not None and not shards.get("latent"):
        raise ValueError(f"data.space=latent but {where} hold no latents: add them with "
                         f"`crossflow data features --in {d.path} --out ... --vae <AutoencoderKL folder>`")
    if space == "pixels" and shards is not None and shards.get("latent"):
        raise ValueError(f"data.space=pixels but {where} hold {tuple(shards['latent'])} latents, which the reader "
                         f"yields instead of the images: set data.space=latent (or auto), or train on shards "
                         f"without latents")
    latent = metadata.latent if metadata is not None else None
    if space == "latent":
        shape, latent = _latent_input(cfg, shards, latent, where)
    else:
        shape = (3, d.resolution, d.resolution)  # the reader resizes stored images to data.resolution
    if metadata is not None and metadata.text is not None:
        _check_text_spec(cfg, metadata.text, where)
    return ModelInput(space, shape, _text_dim(cfg, shards, encoder_dim, where), d.max_tokens, d.resolution, latent)


def _check_upsample_shards(shards: dict, where: str) -> None:
    """Super-resolution (task.source=upsample) makes its low-res source from each image's pixels: shards
    with stored latents (the reader yields those instead of the images) cannot feed it."""
    if shards.get("latent"):
        has_images = "and images (which the reader skips when latents are stored)" if shards.get("image") else \
            "and no images"
        raise ValueError(f"task.source=upsample needs the images' pixels (its low-res source is downsampled from "
                         f"them), but {where} hold {tuple(shards['latent'])} precomputed latents {has_images}: "
                         f"train on shards written without latents (`crossflow data` without --vae) with "
                         f"data.space=latent and data.vae=<AutoencoderKL folder>")
    if not shards.get("image"):
        raise ValueError(f"task.source=upsample needs the images' pixels, but {where} hold no images")


def _is_folder(spec: str) -> bool:
    return spec != "minilm"


def _check_text_spec(cfg, text: TextSpec, where: str) -> None:
    """Prompts embedded at sample time (data.text_encoder, its tokens, layer and multiplier) must match
    how the shards' text features were made. Two different folders pass (the same model may have moved)."""
    d = cfg.data
    if text.encoder != d.text_encoder and not (_is_folder(text.encoder) and _is_folder(d.text_encoder)):
        raise ValueError(f"{where} hold text features of {text.encoder} but data.text_encoder={d.text_encoder}: "
                         f"sampling prompts would not match; set data.text_encoder={text.encoder}")
    check_text_settings(d, text, where)


def _latent_input(cfg, shards: dict | None, latent: LatentSpec | None, where: str):
    """(latent shape, LatentSpec or None) of latent-space training, checked against data.resolution,
    data.latent_channels/latent_downsample and data.vae's autoencoder."""
    from trainer.models.codecs import override_autoencoder, spec_from_autoencoder
    d = cfg.data
    stored = tuple(int(v) for v in shards["latent"]) if shards and shards.get("latent") else None
    if latent is not None and stored is not None and tuple(latent.latent_shape) != stored:
        raise ValueError(f"{where}: metadata says latents {tuple(latent.latent_shape)} but the stored "
                         f"samples are {stored}")
    declared = declared_shape(d, "latent")
    shape = stored or (tuple(latent.latent_shape) if latent else declared)
    if latent is not None and latent.resolution != d.resolution:
        raise ValueError(f"data.resolution={d.resolution} but the latents in {where} were made from "
                         f"{latent.resolution} px images: set data.resolution={latent.resolution}")
    if shape != declared:
        c, h, _ = shape
        raise ValueError(f"{where} hold {shape} latents but data.resolution={d.resolution} with "
                         f"data.latent_channels={d.latent_channels}, data.latent_downsample={d.latent_downsample} "
                         f"declares {declared}: set data.latent_channels={c} and data.latent_downsample="
                         f"{d.resolution // h if d.resolution % h == 0 else '?'} (or data.resolution)")
    if d.vae:
        if latent is None:
            latent = spec_from_autoencoder(d.vae, shape)
        elif str(d.vae).rstrip("/") != str(latent.autoencoder).rstrip("/"):
            latent = override_autoencoder(latent, d.vae, "data.vae")
    return shape, latent


def _text_dim(cfg, shards: dict | None, encoder_dim: int | None, where: str) -> int:
    d = cfg.data
    text_dim = None
    if shards is not None and shards.get("text_emb"):
        n, text_dim = shards["text_emb"]
        if n != d.max_tokens:
            raise ValueError(f"{where} hold {n} text tokens per caption but data.max_tokens={d.max_tokens}: set "
                             f"data.max_tokens={n} (the Text VE is built for a fixed token count)")
    if text_dim is not None and encoder_dim is not None and text_dim != encoder_dim:
        raise ValueError(f"{where} hold {text_dim}-d text features but data.text_encoder={d.text_encoder} gives "
                         f"{encoder_dim}-d: sampling prompts would not match")
    if d.text_dim and (text_dim or encoder_dim) and d.text_dim != (text_dim or encoder_dim):
        raise ValueError(f"data.text_dim={d.text_dim} but {where if text_dim else 'data.text_encoder'} gives "
                         f"{text_dim or encoder_dim}-d text features")
    text_dim = text_dim or encoder_dim or d.text_dim or text_encoder_dim(d.text_encoder)
    if not text_dim:
        raise ValueError("cannot tell the text feature width: set data.text_dim")
    return int(text_dim)


def checkpoint_model_input(config, model_args: dict, features: FeatureMetadata | None) -> ModelInput:
    """What a checkpoint's model was trained on, from its stored config, model args and feature
    metadata (checkpoints written before the metadata existed: pixels when the shape says so)."""
    d = config.data
    shape = tuple(int(v) for v in model_args["latent_shape"])
    latent = features.latent if features is not None else None
    space = d.space if d.space != "auto" else ("pixels" if shape == (3, d.resolution, d.resolution) else "latent")
    task = TASK_PAIRS[(config.task.source, config.task.target)]
    return ModelInput(space, shape, int(model_args.get("text_dim") or d.text_dim or 0), d.max_tokens,
                      d.resolution, latent, task)


def saved_model_input(checkpoint) -> ModelInput:
    """What the checkpoint at ``checkpoint`` (an export, a checkpoint or run directory) was trained on,
    from its metadata alone (``read_checkpoint_metadata``: a checkpoint's small files, or the
    weights file's header; no tensors read)."""
    from trainer.checkpoint import read_checkpoint_metadata
    from trainer.config import config_from_dict
    args, config, features = read_checkpoint_metadata(checkpoint)
    return checkpoint_model_input(config_from_dict(config), args, features)


def check_same_latents(saved: ModelInput, current: ModelInput, checkpoint: str) -> None:
    """Resuming (or initializing) from ``checkpoint`` trained on ``saved``'s input: the same latent
    space and the same latents (shape, resolution, scaling and shift), or an error naming both."""
    def describe(m: ModelInput) -> str:
        if m.space == "pixels":
            return f"pixels {m.latent_shape}"
        spec = m.latent
        extra = (f", {spec.resolution} px, scaling_factor={spec.scaling_factor}, shift_factor={spec.shift_factor}"
                 if spec is not None else "")
        return f"latents {m.latent_shape}{extra}"
    if saved.task != current.task:
        raise ValueError(f"checkpoint {checkpoint} was trained for task {saved.task} but this run's task is "
                         f"{current.task} (task.source, task.target)")
    same = saved.space == current.space and tuple(saved.latent_shape) == tuple(current.latent_shape)
    if same and saved.latent is not None and current.latent is not None:
        a, b = saved.latent, current.latent
        same = (a.resolution, a.scaling_factor, a.shift_factor) == (b.resolution, b.scaling_factor, b.shift_factor)
    if not same:
        raise ValueError(f"checkpoint {checkpoint} was trained on {describe(saved)} but this run's data are "
                         f"{describe(current)}")


def check_init_latents(saved: ModelInput, current: ModelInput, checkpoint: str) -> None:
    """Initializing (``train.init_from``) from ``checkpoint`` trained on ``saved``'s input: the same
    space and, for latents, the same autoencoder's channels, scaling and shift; the resolution may
    differ (the paper's 512 px stage from its 256 px checkpoint). The error names both values."""
    def kind(m: ModelInput) -> tuple:
        if m.space == "pixels" or m.latent is None:
            return (m.space, m.latent_shape[0])
        return (m.space, m.latent_shape[0], m.latent.scaling_factor, m.latent.shift_factor)
    if kind(saved) != kind(current):
        names = ("space", "channels", "scaling_factor", "shift_factor")
        describe = lambda k: ", ".join(f"{n}={v}" for n, v in zip(names, k))  # noqa: E731
        raise ValueError(f"train.init_from={checkpoint} was trained on {describe(kind(saved))} but this run's data "
                         f"are {describe(kind(current))}")


def resolved_config(cfg, model_input: ModelInput):
    """A copy of ``cfg`` with what training resolved written in (data.space, data.text_dim, data.vae =
    the autoencoder folder): the config.json and checkpoint config that sampling reads."""
    import copy
    out = copy.deepcopy(cfg)
    out.data.space = model_input.space
    out.data.text_dim = model_input.text_dim
    if model_input.latent is not None:
        out.data.vae = model_input.latent.autoencoder
    return out
