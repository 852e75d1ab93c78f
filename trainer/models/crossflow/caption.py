"""The caption target (``task.target: caption``): a text latent the flow ends at, and its codec.

The paper captions by flowing from an image VE's z0 to a text latent and decoding that latent with
a separate text decoder (COCO B@4 36.4; code never released). Here the codec is a small
caption autoencoder trained with the flow, jointly or first (``task.target_pretrain_steps``):

    encode  caption token embeddings (B, n, d), mask (B, n)  -> mu, logvar, each (B, C, h, w)
            (the Text VE's class, over the caption's own features; the flow's target is its mu)
    decode  latent (B, C, h, w) -> token logits (B, n, vocab)

The decoder is non-autoregressive: the latent's h*w pixels become tokens (a linear embedding of
their C values plus a learned position), n learned query tokens (one per caption position) join
them, a few pre-norm self-attention blocks mix the two, and the queries are read out through a
linear layer to the vocabulary. ``caption_loss`` is the cross-entropy over all n positions,
padding included: the decoder must learn where the caption ends.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.models.crossflow.layers import register_pos_embed
from trainer.models.crossflow.text_ve import EncoderBlock, TextProjection, TextVE


def caption_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits (B, n, vocab), ids (B, n) int64 -> mean cross-entropy over every position (padding too)."""
    if logits.shape[:2] != ids.shape:
        raise ValueError(f"caption logits {tuple(logits.shape)} do not match token ids {tuple(ids.shape)}")
    return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())


class CaptionDecoder(nn.Module):
    """latent (B, C, h, w) -> logits (B, tokens, vocab) (see the module docstring)."""

    def __init__(self, latent_shape: tuple[int, int, int], vocab: int, tokens: int, width: int, depth: int,
                 head_dim: int = 64):
        super().__init__()
        C, h, w = latent_shape
        if h != w:
            raise ValueError(f"caption decoder needs a square latent, got {tuple(latent_shape)}")
        self.latent_pixels = h * w
        self.latent_embed = nn.Linear(C, width)
        register_pos_embed(self, "learned", width, h)  # pos_embed (1, h*w, width), starts at sin-cos
        self.query_pos_embed = nn.Parameter(torch.randn(1, tokens, width) * 0.02)  # one query per caption position
        self.blocks = nn.ModuleList(EncoderBlock(width, min(head_dim, width), 0.0) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.to_vocab = nn.Linear(width, vocab)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B = z.shape[0]
        x = self.latent_embed(z.flatten(2).transpose(1, 2)) + self.pos_embed  # (B, h*w, W)
        x = torch.cat([x, self.query_pos_embed.expand(B, -1, -1).to(x.dtype)], dim=1)  # (B, h*w + n, W)
        for block in self.blocks:
            x = block(x, None)
        return self.to_vocab(self.norm(x[:, self.latent_pixels:]))  # (B, n, vocab)


class CaptionAutoencoder(nn.Module):
    """Caption VE (a ``TextVE`` over the caption's max_tokens token embeddings, behind the optional
    ``TextProjection``) and ``CaptionDecoder`` to ``tokens`` token ids; both at the Text VE's
    width and depth."""

    def __init__(self, text_dim: int, max_tokens: int, latent_shape: tuple[int, int, int], vocab: int, tokens: int,
                 width: int, depth: int, reduced_width: int, text_proj_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        if vocab <= 0 or tokens <= 0:
            raise ValueError(f"caption target needs the text encoder's vocabulary size and the caption's token "
                             f"count (caption_vocab, caption_tokens), got {vocab} and {tokens}")
        self.text_proj = TextProjection(text_dim, text_proj_dim) if text_proj_dim else None
        self.ve = TextVE(text_proj_dim or text_dim, max_tokens, latent_shape, width, depth, reduced_width,
                         dropout=dropout)
        self.decoder = CaptionDecoder(latent_shape, vocab, tokens, width, depth)

    def encode(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """emb (B, n, d), mask (B, n) True = real token -> mu, logvar, each (B, C, h, w)."""
        if self.text_proj is not None:
            emb = self.text_proj(emb)  # (B, n, text_proj_dim)
        return self.ve(emb, mask)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, C, h, w) -> logits (B, n, vocab)."""
        return self.decoder(z)
