"""Tiny random-weight stand-ins for CLIP, T5 and the SD autoencoder, saved with ``save_pretrained``.

Each function writes a folder that loads exactly like the real model's (``from_pretrained`` with
``local_files_only=True``), tokenizer included, offline and deterministic (same seed, same bytes).
Models are small enough to build in well under a second on CPU. Returns the folder as a ``str``.

    save_tiny_clip(d)                    CLIPModel + CLIPTokenizer + CLIPImageProcessor (eval clip works)
    save_tiny_clip(d, text_only=True)    CLIPTextModel + CLIPTokenizer
    save_tiny_t5(d)                      T5ForConditionalGeneration + T5TokenizerFast
    save_tiny_t5(d, encoder_only=True)   T5EncoderModel + T5TokenizerFast
    save_tiny_vae(d)                     AutoencoderKL: 3 -> 4 channels, downsampling 8 like the SD VAE
    tiny_text_encoder()                  the tiny CLIP text tower the tests' tiny runs embed captions
                                         with (``data.text_encoder``): saved once per process
"""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import string
import tempfile
from pathlib import Path

import torch

TINY_TEXT_WIDTH = 32  # hidden size of the tiny CLIP and T5 text towers
TINY_MAX_POSITIONS = 77  # CLIP's context length; the tiny CLIP accepts the paper's 77 tokens

# Words that get their own token (everything else splits into characters): the shapes captions' words.
_WORDS = ("a", "the", "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "small", "large",
          "big", "circle", "square", "triangle", "on", "left", "right", "top", "bottom", "of", "and", "in", "cat",
          "dog", "photo")



def _build(factory, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


# ---------------------------------------------------------------------------------------------
# CLIP

def _write_clip_bpe(d: Path) -> dict[str, int]:
    """A byte-level BPE vocabulary: every byte alone and word-final, merges spelling out ``_WORDS``."""
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges = []
    for word in _WORDS:  # merge left to right: "r e", "re d</w>"
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merges.append(f"{left} {right}")
            left = left + right
            if left not in tokens:
                tokens.append(left)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab


def _clip_text_config(vocab: dict[str, int]) -> dict:
    return dict(vocab_size=len(vocab), hidden_size=TINY_TEXT_WIDTH, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=TINY_MAX_POSITIONS, projection_dim=16,
                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"])


def save_tiny_clip(directory: str | Path, text_only: bool = False, seed: int = 0) -> str:
    """A tiny CLIPModel (or CLIPTextModel with ``text_only``) with a working CLIPTokenizer (slow and
    fast load from the same vocab.json/merges.txt). The full model also saves a CLIPImageProcessor
    (32 px) so ``CLIPProcessor.from_pretrained`` and ``crossflow eval clip`` accept the folder."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig,
                              CLIPTextModel, CLIPTokenizer)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vocab = _write_clip_bpe(d)
    tokenizer = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=TINY_MAX_POSITIONS,
                              pad_token="<|endoftext|>")
    text = _clip_text_config(vocab)
    if text_only:
        tokenizer.save_pretrained(d)
        _build(lambda: CLIPTextModel(CLIPTextConfig(**text)), seed).save_pretrained(d)
        return str(d)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(d)
    config = CLIPConfig(text_config=text, projection_dim=16,
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, projection_dim=16))
    _build(lambda: CLIPModel(config), seed).save_pretrained(d)
    return str(d)


@functools.cache
def tiny_text_encoder() -> str:
    """Folder of a tiny CLIP text tower (width ``TINY_TEXT_WIDTH``), saved on first use in this process
    and removed at its exit: what the tests' tiny runs give as ``data.text_encoder``, so captions go
    through the path users run (tokenizer, transformer, mask), and a folder reaches torchrun and Ray
    workers as a plain path."""
    root = Path(tempfile.mkdtemp(prefix="crossflow-tiny-clip-text-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return save_tiny_clip(root, text_only=True)


# ---------------------------------------------------------------------------------------------
# T5

def _t5_tokenizer():
    """A T5TokenizerFast over a ``tokenizers`` Unigram model (what sentencepiece's converter builds):
    ids 0/1/2 = <pad>/</s>/<unk> as in T5; word pieces prefixed with the metaspace ``▁``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast
    pieces = ["<pad>", "</s>", "<unk>", "▁"]
    pieces += ["▁" + w for w in _WORDS]
    pieces += ["▁" + c for c in string.ascii_lowercase + string.digits]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    pieces = list(dict.fromkeys(pieces))
    vocab = [(p, 0.0 if i < 3 else -float(len(pieces) - i) / len(pieces) - (0 if len(p) > 2 else 5.0))
             for i, p in enumerate(pieces)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)


def save_tiny_t5(directory: str | Path, encoder_only: bool = False, seed: int = 0) -> str:
    """A tiny T5ForConditionalGeneration (or T5EncoderModel with ``encoder_only``) with a T5TokenizerFast
    saved as tokenizer.json (no sentencepiece needed)."""
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tokenizer = _t5_tokenizer()
    tokenizer.save_pretrained(d)
    config = T5Config(vocab_size=len(tokenizer), d_model=TINY_TEXT_WIDTH, d_kv=8, d_ff=64, num_layers=3,
                      num_decoder_layers=1, num_heads=4, relative_attention_num_buckets=8,
                      feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    cls = T5EncoderModel if encoder_only else T5ForConditionalGeneration
    _build(lambda: cls(config), seed).save_pretrained(d)
    return str(d)


# ---------------------------------------------------------------------------------------------
# Autoencoder

def save_tiny_vae(directory: str | Path, scaling_factor: float = 0.18215, shift_factor: float | None = None,
                  seed: int = 0) -> str:
    """A tiny diffusers AutoencoderKL shaped like the SD VAE: RGB in, 4 latent channels, four blocks
    (three downsamplings: 256 px -> 4x32x32), widths of 8 so it encodes a 64 px batch in milliseconds."""
    from diffusers import AutoencoderKL
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    vae = _build(lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor), seed)
    vae.save_pretrained(d)
    return str(d)
