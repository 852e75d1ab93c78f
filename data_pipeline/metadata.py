"""How a shard set's features were made, stored beside its shards as ``crossflow_features.json``.

``crossflow data features`` (and ``data convert`` with feature flags) writes it; training reads it
to build its codec and to check that config and shards agree; checkpoints copy it. Local folders
and ``s3://`` prefixes alike. Shards without the file (pixel-only shards, or shards written before
it existed) read as ``FeatureMetadata()`` with both parts ``None``.

    {"latent": {"autoencoder": "/models/sd-vae-ft-ema", "scaling_factor": 0.18215,
                "shift_factor": 0.0, "resolution": 256, "latent_shape": [4, 32, 32],
                "std": 1.02, "mean": 0.01},
     "text":   {"encoder": "/models/clip-vit-large-patch14", "max_tokens": 77, "dim": 768,
                "hidden_layer": -1, "multiplier": 1.0}}
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

FEATURES_FILE = "crossflow_features.json"
DEFAULT_MAX_TOKENS = 77  # text tokens per caption: CLIP's context, the paper's 77; `data features` and training agree


@dataclass
class LatentSpec:
    """How stored ``latent`` columns were made: z = (posterior_mean - shift_factor) * scaling_factor."""
    autoencoder: str  # local folder of the diffusers AutoencoderKL that encoded them
    scaling_factor: float
    shift_factor: float
    resolution: int  # image side in pixels fed to the autoencoder
    latent_shape: tuple[int, int, int]  # (C, h, w)
    std: float | None = None  # measured over the stored (scaled) latents; None when not measured
    mean: float | None = None

    def __post_init__(self):
        self.latent_shape = tuple(int(v) for v in self.latent_shape)


@dataclass
class TextSpec:
    """How stored ``text_emb`` columns were made."""
    encoder: str  # "minilm", or the local folder of the transformers model
    max_tokens: int
    dim: int
    hidden_layer: int = -1  # -1 = last hidden state, -2 = penultimate, ...
    multiplier: float = 1.0  # embeddings multiplied by this before storing (the reimplementation's T5 uses 10)


@dataclass
class FeatureMetadata:
    latent: LatentSpec | None = None
    text: TextSpec | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know, kept on rewrite

    def to_dict(self) -> dict:
        out = dict(self.extra)
        if self.latent is not None:
            out["latent"] = dataclasses.asdict(self.latent)
            out["latent"]["latent_shape"] = list(self.latent.latent_shape)
        if self.text is not None:
            out["text"] = dataclasses.asdict(self.text)
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureMetadata":
        d = dict(d or {})
        latent = d.pop("latent", None)
        text = d.pop("text", None)
        return cls(LatentSpec(**latent) if latent else None, TextSpec(**text) if text else None, d)


def check_text_settings(data_cfg, spec: TextSpec | None, where: str) -> None:
    """Training's text settings (``data.max_tokens``, ``data.text_hidden_layer``,
    ``data.text_multiplier``) must be those the shards' text features were made with, or prompts
    embedded at sample time would not look like the training captions. Raises naming both values."""
    if spec is None:
        return
    for key, stored in (("max_tokens", spec.max_tokens), ("text_hidden_layer", spec.hidden_layer),
                        ("text_multiplier", spec.multiplier)):
        ours = getattr(data_cfg, key)
        if float(ours) != float(stored):
            raise ValueError(f"{where} hold text features made with {key}={stored} (crossflow_features.json) but "
                             f"data.{key}={ours}: set data.{key}={stored}, or remake the features")


def _join(path: str) -> str:
    return str(path).rstrip("/") + "/" + FEATURES_FILE


def read_feature_metadata(path: str) -> FeatureMetadata:
    """The metadata beside the shards at ``path`` (folder or s3://); empty when there is none."""
    target = _join(path)
    if str(path).startswith("s3://"):
        from data_pipeline.s3 import s3_filesystem
        fs = s3_filesystem()
        if not fs.exists(target):
            return FeatureMetadata()
        with fs.open(target, "r") as f:
            raw = f.read()
    else:
        p = Path(target)
        if not p.is_file():
            return FeatureMetadata()
        raw = p.read_text()
    try:
        return FeatureMetadata.from_dict(json.loads(raw))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{target} is not valid crossflow feature metadata: {e}") from e


def write_feature_metadata(path: str, meta: FeatureMetadata) -> None:
    text = json.dumps(meta.to_dict(), indent=2)
    target = _join(path)
    if str(path).startswith("s3://"):
        from data_pipeline.s3 import s3_filesystem
        with s3_filesystem().open(target, "w") as f:
            f.write(text)
    else:
        Path(path).mkdir(parents=True, exist_ok=True)
        Path(target).write_text(text)
