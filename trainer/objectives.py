"""CrossFlow's training objective, apart from the backbone.

    loss = mean_b FM_b  +  contrastive_weight * InfoNCE(z0, image)  +  kl_weight * KL(q(z0|text) || N(0, I))

Flow matching carries z0 (the text's sample, t = 0) to the image latent z1 (t = 1):
    x_t = (1 - (1 - sigma_min) t) z0 + t z1,    v* = z1 - (1 - sigma_min) z0.
Gradients flow into z0, so the Text VE trains jointly with the flow. A fraction of the batch
trains the unconditional indicator: those samples keep their z0 but their targets are shuffled
among themselves, so the unconditional velocity learns the image marginal (what CFG subtracts).
Every coefficient comes from ``ObjectiveConfig``. The same objective trains the cross-attention
baseline (z0 is noise, KL is 0, ``text_condition`` carries the text to ``velocity``, and there is
no contrastive term since its z0 does not come from the text).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL

# The contrastive logit scale (log of the inverse temperature) is clamped here, as in CLIP: a
# temperature no lower than 1/100 keeps the logits from growing until the softmax saturates.
# ln 100 = 4.60517..., written rounded as 4.6052 since the first version; kept so runs reproduce.
MAX_LOGIT_SCALE = 4.6052

# Per-sample noise seeds mix (seed, step, index) into one integer: each stride (a prime) exceeds the
# range of what is added after it (steps < 1_000_003, sample indices < 2^31 - 1), so two samples of
# a run never share a seed; the mask keeps it a non-negative int64, as torch.Generator.manual_seed takes.
SEED_STEP_MIXER = 1_000_003
SEED_INDEX_MIXER = 2_147_483_647  # 2^31 - 1
SEED_MASK = 2**63 - 1


@dataclass
class Losses:
    total: torch.Tensor
    flow_matching: torch.Tensor
    kl: torch.Tensor
    contrastive: torch.Tensor

    def detached(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in vars(self).items()}


def sample_time(batch: int, cfg, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """t in (0, 1), shape (B,): logit-normal sigmoid(N(mean, std)) or uniform."""
    if cfg.time_sampler == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    n = torch.randn(batch, device=device, generator=generator)
    return torch.sigmoid(cfg.time_mean + cfg.time_std * n)


def unconditional_partners(uncond: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(M,) index of the sample whose image each sample trains towards: itself when conditional;
    for unconditional ones, the previous unconditional sample in ``keys`` order (a random cyclic
    shift, so none keeps its own image when there are two or more)."""
    source = torch.arange(uncond.numel())
    idx = torch.nonzero(uncond).flatten()  # (U,)
    if idx.numel() >= 2:
        order = idx[torch.argsort(keys[idx])]
        source[order] = order.roll(1)
    return source


@dataclass
class Noise:
    """The randomness of one micro-batch on one rank: t, the CFG indicator, eps of z0, and where
    each sample's target image comes from in the micro-step's gathered batch (all ranks)."""
    t: torch.Tensor  # (b,)
    indicator: torch.Tensor  # (b,) long
    eps: torch.Tensor  # (b, C, H, W)
    target_source: torch.Tensor  # (b,) long, rows of the gathered (rank-major) z1


def _sample_seed(seed: int, step: int, index: int) -> int:
    return ((seed * SEED_STEP_MIXER + step) * SEED_INDEX_MIXER + index) & SEED_MASK


def draw_noise(cfg, seed: int, step: int, first_index: int, micro_batch: int, rank: int, world_size: int,
               latent_shape, device) -> Noise:
    """Noise keyed by (seed, optimizer step, the sample's position in the step's global batch), not
    by rank or micro-batch size, so N ranks draw exactly what one process with the same global
    batch draws. Samplers deal the global batch round-robin: rank r's i-th sample of the micro-step
    starting at position ``first_index`` (= k * micro_batch * world_size) is at
    ``first_index + i * world_size + r``. One small CPU generator per sample: cheap next to a step."""
    M = micro_batch * world_size
    t, uncond, keys, eps = torch.empty(M), torch.zeros(M, dtype=torch.bool), torch.empty(M), []
    for q in range(M):  # q: row of the gathered batch (rank-major)
        r, i = divmod(q, micro_batch)
        g = torch.Generator().manual_seed(_sample_seed(seed, step, first_index + i * world_size + r))
        t[q] = sample_time(1, cfg, "cpu", g)[0]
        uncond[q] = torch.rand(1, generator=g)[0] < cfg.uncond_prob
        keys[q] = torch.rand(1, generator=g)[0]
        if r == rank:
            eps.append(torch.randn(tuple(latent_shape), generator=g))
    local = slice(rank * micro_batch, (rank + 1) * micro_batch)
    indicator = torch.where(uncond, UNCONDITIONAL, CONDITIONAL).long()
    return Noise(t=t[local].to(device), indicator=indicator[local].to(device), eps=torch.stack(eps).to(device),
                 target_source=unconditional_partners(uncond, keys)[local].to(device))


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)): summed over the latent, averaged over the batch."""
    kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())  # (B, C, H, W)
    return kl.flatten(1).sum(dim=1).mean()


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (rank-major) and this rank's offset; gradients flow back to local rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import torch.distributed.nn.functional as dist_nn
    rows = dist_nn.all_gather(x)
    return torch.cat(rows, dim=0), dist.get_rank() * x.shape[0]


def contrastive_loss(z0: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP-style symmetric cross-entropy between L2-normalized flattened z0 and image embeddings.
    Negatives are gathered from every rank when distributed (each rank's local rows are the queries)."""
    text = F.normalize(z0.float().flatten(1), dim=1)  # (B, E)
    image = F.normalize(image_emb.float(), dim=1)  # (B, E)
    all_text, offset = _gather_with_grad(text)  # (W*B, E)
    all_image, _ = _gather_with_grad(image)
    scale = logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp()  # inverse temperature, at most 100
    labels = torch.arange(text.shape[0], device=text.device) + offset
    logits_t2i = scale * text @ all_image.t()  # (B, W*B)
    logits_i2t = scale * image @ all_text.t()  # (B, W*B)
    return 0.5 * (F.cross_entropy(logits_t2i, labels) + F.cross_entropy(logits_i2t, labels))


def _gather_batch(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, rank-major, without gradient (targets are data)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, x.contiguous())
    return torch.cat(rows)


def crossflow_losses(model, z1: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor, cfg, ops,
                     noise: Noise) -> Losses:
    """One forward of the whole objective for a batch (z1: target latents (B, C, H, W)); ``noise``
    (from ``draw_noise``) fixes every random draw."""
    z0, mu, logvar = model.encode_text(text_emb, text_mask, eps=noise.eps)  # (B, C, H, W) each
    indicator, t = noise.indicator, noise.t
    target = _gather_batch(z1)[noise.target_source]  # uncond targets may come from other ranks
    cond = model.text_condition(text_emb, text_mask)  # None for CrossFlow: its text is all in z0
    x_t = ops.interpolate(z0, target, t, cfg.sigma_min)  # (B, C, H, W)
    v = model.velocity(x_t, t, indicator, cond)
    fm = ops.flow_matching_loss(v, z0, target, cfg.sigma_min).mean()
    kl = kl_divergence(mu, logvar)
    con = contrastive_loss(z0, *model.embed_image(z1)) \
        if cfg.contrastive_weight > 0 and model.source_from_text else fm.new_zeros(())
    total = fm + cfg.kl_weight * kl + cfg.contrastive_weight * con
    return Losses(total=total, flow_matching=fm, kl=kl, contrastive=con)
