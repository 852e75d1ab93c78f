"""CrossFlow's training objective, apart from the backbone.

    loss = mean_b FM_b  +  contrastive_weight * InfoNCE(z0, image)  +  kl_weight * KL(q(z0|text) || N(0, I))

Flow matching carries z0 (the text's sample, t = 0) to the image latent z1 (t = 1):
    x_t = (1 - (1 - sigma_min) t) z0 + t z1,    v* = z1 - (1 - sigma_min) z0.
Gradients flow into z0, so the Text VE trains jointly with the flow. A fraction of the batch
trains the unconditional indicator: those samples keep their z0 but their targets are shuffled
among themselves, so the unconditional velocity learns the image marginal (what CFG subtracts).
Every coefficient comes from ``ObjectiveConfig``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.models.crossflow.layers import TORCH_OPS
from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL


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


def draw_indicator(batch: int, uncond_prob: float, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B,) long: CONDITIONAL, or UNCONDITIONAL with probability ``uncond_prob``."""
    uncond = torch.rand(batch, device=device, generator=generator) < uncond_prob
    return torch.where(uncond, UNCONDITIONAL, CONDITIONAL).long()


def swap_unconditional_targets(z1: torch.Tensor, indicator: torch.Tensor,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """Each unconditional sample's target becomes another unconditional sample's image
    (a random cyclic shift among them, so none keeps its own when there are two or more)."""
    idx = torch.nonzero(indicator == UNCONDITIONAL).flatten()  # (U,)
    if idx.numel() < 2:
        return z1
    perm = idx[torch.randperm(idx.numel(), generator=generator, device=idx.device)]
    out = z1.clone()
    out[perm] = z1[perm.roll(1)]
    return out


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
    scale = logit_scale.float().clamp(max=4.6052).exp()  # temperature at most 1/100, as in CLIP
    labels = torch.arange(text.shape[0], device=text.device) + offset
    logits_t2i = scale * text @ all_image.t()  # (B, W*B)
    logits_i2t = scale * image @ all_text.t()  # (B, W*B)
    return 0.5 * (F.cross_entropy(logits_t2i, labels) + F.cross_entropy(logits_i2t, labels))


def crossflow_losses(model, z1: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor, cfg,
                     ops=TORCH_OPS, generator: torch.Generator | None = None) -> Losses:
    """One forward of the whole objective for a batch (z1: target latents (B, C, H, W))."""
    B = z1.shape[0]
    z0, mu, logvar = model.encode_text(text_emb, text_mask, generator=generator)  # (B, C, H, W) each
    indicator = draw_indicator(B, cfg.uncond_prob, z1.device, generator)  # (B,)
    target = swap_unconditional_targets(z1, indicator, generator)  # (B, C, H, W)
    t = sample_time(B, cfg, z1.device, generator)  # (B,)
    x_t = ops.interpolate(z0, target, t, cfg.sigma_min)  # (B, C, H, W)
    v = model.velocity(x_t, t, indicator)
    fm = ops.flow_matching_loss(v, z0, target, cfg.sigma_min).mean()
    kl = kl_divergence(mu, logvar)
    con = contrastive_loss(z0, model.embed_image(z1), model.logit_scale) if cfg.contrastive_weight > 0 \
        else fm.new_zeros(())
    total = fm + cfg.kl_weight * kl + cfg.contrastive_weight * con
    return Losses(total=total, flow_matching=fm, kl=kl, contrastive=con)
