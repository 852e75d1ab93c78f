"""CrossFlow's training objective, apart from the backbone.

    loss = mean_b FM_b  +  contrastive_weight * InfoNCE(z0, image)  +  kl_weight * KL(q(z0|text) || N(0, I))

The paper's ablations (Table 3) are config values: ``objective.contrastive`` picks z0's alignment
term (``z0_alignment_loss``: InfoNCE with the image, InfoNCE with the text's own features, or MSE
reconstruction of them); a deterministic Text VE has no KL (logged as 0); two-stage training
(``objective.ve_pretrain_steps``) runs a stage per optimizer step (``training_stage``): the Text VE
alone on alignment + KL, then the flow on flow matching with the VE frozen (a zero gradient into it;
the engine gives its parameters learning rate 0) or, with ``ve_finetune``, the joint objective.

Flow matching carries z0 (the text's sample, t = 0) to the image latent z1 (t = 1):
    x_t = (1 - (1 - sigma_min) t) z0 + t z1,    v* = z1 - (1 - sigma_min) z0.
Gradients flow into z0, so the Text VE trains jointly with the flow. A fraction of the batch
trains the unconditional indicator: those samples keep their z0 but their targets are shuffled
among themselves, so the unconditional velocity learns the image marginal (what CFG subtracts).
The shuffle spans the whole micro-step (all ranks), as one process with the same global batch would
do; ranks exchange indices, not latents: each computes the global partner map from per-sample
scalars and fetches only the rows its unconditional samples need (``swapped_targets``).
All randomness comes from ``draw_noise``: a counter-based RNG keyed by (seed, step, the sample's
global position), so N ranks draw exactly what one process draws.
The tasks beside text to image (``trainer.tasks``) run through the same function (``flow_losses``):
z0 from the task's source (an image VE, or an upsampled image with no KL and no alignment term), z1
from its target (an image, a depth map) or, for captioning, the caption VE's mean (detached), whose
caption autoencoder adds its own terms: the decoder's cross-entropy on a sample of the caption VE
plus ``task.caption_kl_weight`` x its KL (logged as caption_ce and caption_kl); its two stages
(``task.target_pretrain_steps``) reuse the Text VE's mechanism, with the caption autoencoder as the
part trained first and then frozen.
Every coefficient comes from ``ObjectiveConfig``. The same objective trains the cross-attention
baseline (z0 is noise, KL is 0, ``text_condition`` carries the text to ``velocity``, and there is
no contrastive term since its z0 does not come from the text).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.models.crossflow.flow_transformer import CONDITIONAL, UNCONDITIONAL
from trainer.models.crossflow.text_heads import pooled_text_features

# The contrastive logit scale (log of the inverse temperature) is clamped here, as in CLIP: a
# temperature no lower than 1/100 keeps the logits from growing until the softmax saturates.
# ln 100 = 4.60517..., written rounded as 4.6052 since the first version; kept so runs reproduce.
MAX_LOGIT_SCALE = 4.6052

# The counter-based RNG (see ``draw_noise``) works on 32-bit words held in int64 tensors (or ints).
WORD = 0xFFFFFFFF
# Start words of the two 32-bit halves of a sample's 64-bit key (any two distinct constants).
KEY_STARTS = (0x243F6A88, 0x85A308D3)
# Per-sample counters: one per scalar draw, then one per element of eps.
TIME_COUNTER, UNCOND_COUNTER, PARTNER_COUNTER, EPS_FIRST_COUNTER = 0, 1, 2, 3

# What an optimizer step trains (``training_stage``): everything (joint; the default, and two-stage
# training's fine-tuning), the Text VE alone (two-stage's first stage), the flow alone (then, VE frozen);
# for the caption target (task.target_pretrain_steps): the caption autoencoder alone, then the flow and
# the source with the caption autoencoder frozen.
JOINT, VE_PRETRAIN, FLOW_ONLY = "joint", "ve_pretrain", "flow_only"
CAPTION_PRETRAIN, CAPTION_FROZEN = "caption_pretrain", "caption_frozen"
PRETRAIN_STAGES, FROZEN_STAGES = (VE_PRETRAIN, CAPTION_PRETRAIN), (FLOW_ONLY, CAPTION_FROZEN)


@dataclass(frozen=True)
class TwoStage:
    """Two-stage training: the first ``steps`` optimizer steps train only ``part`` (text: the Text
    VE side, objective.ve_pretrain_steps; caption: the caption autoencoder, task.target_pretrain_steps),
    then the rest trains with ``part`` frozen (or, with ``finetune``, everything). steps 0: joint."""
    steps: int = 0
    finetune: bool = False
    part: str = "text"


def two_stage_of(objective, task=None) -> TwoStage:
    """The run's two stages from its ObjectiveConfig and TaskConfig (validation allows one of the two)."""
    if task is not None and task.target_pretrain_steps:
        return TwoStage(task.target_pretrain_steps, False, "caption")
    return TwoStage(objective.ve_pretrain_steps, objective.ve_finetune, "text")


def as_two_stage(plan) -> TwoStage:
    """A TwoStage as it is, or an ObjectiveConfig's (objective.ve_pretrain_steps)."""
    return plan if isinstance(plan, TwoStage) else two_stage_of(plan)


def training_stage(plan, step: int) -> str:
    """The stage of the optimizer step after ``step`` completed ones (0-based): a function of the
    step alone, so a resumed run continues in the right stage. ``plan``: a TwoStage or an ObjectiveConfig."""
    plan = as_two_stage(plan)
    caption = plan.part == "caption"
    if step < plan.steps:
        return CAPTION_PRETRAIN if caption else VE_PRETRAIN
    if plan.steps and not plan.finetune:
        return CAPTION_FROZEN if caption else FLOW_ONLY
    return JOINT


@dataclass
class Losses:
    total: torch.Tensor
    flow_matching: torch.Tensor
    kl: torch.Tensor
    contrastive: torch.Tensor
    caption_ce: torch.Tensor | None = None  # caption target: the decoder's cross-entropy
    caption_kl: torch.Tensor | None = None  # caption target: the caption VE's KL

    def detached(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in vars(self).items() if v is not None}


def unconditional_partners(uncond: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(M,) index of the sample whose image each sample trains towards: itself when conditional;
    for unconditional ones, the previous unconditional sample in ``keys`` order (a random cyclic
    shift, so none keeps its own image when there are two or more)."""
    source = torch.arange(uncond.numel())
    idx = torch.nonzero(uncond).flatten()  # (U,)
    if idx.numel() >= 2:
        order = idx[torch.argsort(keys[idx], stable=True)]
        source[order] = order.roll(1)
    return source


# ----------------------------------------------------------------------------- counter-based RNG
def _mul32(x, c: int):
    """(x * c) mod 2^32 for words x < 2^32, exact in int64: c split in 16-bit halves so no product
    exceeds 2^49 (a plain int64 product of two 32-bit words could overflow). In place on a tensor."""
    lo, hi = c & 0xFFFF, c >> 16
    t = x * hi
    t &= 0xFFFF
    t <<= 16
    x *= lo
    x += t
    x &= WORD
    return x


def _lowbias32(x):
    """A bijective 32-bit integer hash (C. Wellons' lowbias32: bias 0.17 in his avalanche test), on
    int64 tensors or ints holding words < 2^32; the same bits on CPU and CUDA (integer ops only).
    A tensor argument is left as it is (the work is done in place on a copy: half the time)."""
    if isinstance(x, torch.Tensor):
        x = x.clone()
    x ^= x >> 16
    x = _mul32(x, 0x7FEB352D)
    x ^= x >> 15
    x = _mul32(x, 0x846CA68B)
    x ^= x >> 16
    return x


def sample_keys(seed: int, step: int, positions: torch.Tensor) -> torch.Tensor:
    """(N, 2) int64: each sample's 64-bit key (two 32-bit words), a hash chain of (seed, optimizer
    step, the sample's position in the step's global batch). Distinct positions get distinct keys
    (each half is a bijection of the position for a fixed seed and step)."""
    seed &= 2**64 - 1
    words = []
    for start in KEY_STARTS:
        h = _lowbias32(_lowbias32(_lowbias32(start ^ (seed & WORD)) ^ (seed >> 32)) ^ (step & WORD))
        words.append(_lowbias32(positions.long() ^ h))  # (N,)
    return torch.stack(words, dim=1)  # (N, 2)


def random_bits(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(N, E) int64 words < 2^32: draw ``counters[e]`` of sample ``keys[n]`` (Philox-style, a pure
    function of key and counter, so any rank computes any sample's draw, in any order): the hashed
    counter, keyed by the first word, hashed again, then whitened by the second. One hash per
    element (the counters' hashes are shared by all samples); within a sample the words are a
    bijection of the counter, so no two elements of a sample draw the same word."""
    c = _lowbias32(counters.long())  # (E,)
    x = _lowbias32(keys[:, :1] ^ c)  # (N, E)
    x ^= keys[:, 1:]
    return x


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Uniform in (0, 1), float32, from the top 24 bits: (k + 1/2) / 2^24, exact."""
    return ((bits >> 8).float() + 0.5) * 2.0**-24


def bits_to_normal(bits: torch.Tensor) -> torch.Tensor:
    """N(0, 1), float32, by inverting the CDF: sqrt(2) erfinv(2u - 1), u from the top 24 bits (|x| <
    5.4); 2u - 1 = (2k + 1 - 2^24) / 2^24 is exact in float32."""
    v = ((bits >> 8) * 2 + (1 - 2**24)).float() * 2.0**-24  # in (-1, 1)
    return torch.erfinv(v) * math.sqrt(2.0)


def _scalar_draw(keys: torch.Tensor, counter: int) -> torch.Tensor:
    return random_bits(keys, torch.tensor([counter], device=keys.device))[:, 0]  # (N,)


def time_from_bits(bits: torch.Tensor, cfg) -> torch.Tensor:
    """t in (0, 1) per ``cfg.time_sampler``: uniform, or logit-normal sigmoid(N(mean, std))."""
    if cfg.time_sampler == "uniform":
        return bits_to_uniform(bits)
    return torch.sigmoid(cfg.time_mean + cfg.time_std * bits_to_normal(bits))


# ----------------------------------------------------------------------------- noise of a micro-step
@dataclass
class TargetSwap:
    """Where each local sample's target image comes from, moving only the rows that cross ranks:
    ``index`` picks rows of cat(local z1, rows received from other ranks); ``send_rows`` are the
    local rows other ranks need, grouped by destination rank (counts ``send_counts``), and
    ``recv_counts`` how many rows come from each rank. ``exchange`` is False when no row crosses a
    rank (every rank computes the same global map, so all agree on skipping the collective)."""
    index: torch.Tensor  # (b,) long
    send_rows: torch.Tensor  # (n_send,) long
    send_counts: list[int]
    recv_counts: list[int]
    exchange: bool


@dataclass
class Noise:
    """The randomness of one micro-batch on one rank: t, the CFG indicator, eps of z0, and where
    each sample's target image comes from (``swap``)."""
    t: torch.Tensor  # (b,)
    indicator: torch.Tensor  # (b,) long
    eps: torch.Tensor  # (b, C, H, W)
    swap: TargetSwap
    target_eps: torch.Tensor | None = None  # (b, C, H, W): the caption VE's eps (caption target), else None


def target_swap(source: torch.Tensor, rank: int, micro_batch: int, world_size: int) -> TargetSwap:
    """The exchange plan of the partner map ``source`` (M,) over the micro-step's rank-major rows
    (row q trains on rank q // b towards the image of row source[q], held by rank source[q] // b)."""
    b, M = micro_batch, source.numel()
    owner = source // b  # (M,) rank holding each row's target
    dest = torch.arange(M) // b  # (M,) rank training each row
    cross = owner != dest
    outgoing = cross & (owner == rank)  # rows are in ascending q, so already grouped by destination
    send_rows = source[outgoing] - rank * b
    send_counts = torch.bincount(dest[outgoing], minlength=world_size).tolist()
    local = slice(rank * b, (rank + 1) * b)
    local_owner = owner[local]  # (b,)
    foreign = (local_owner != rank).nonzero().flatten()
    foreign = foreign[torch.argsort(local_owner[foreign], stable=True)]  # received grouped by sender, then row
    index = source[local] - rank * b
    index[foreign] = b + torch.arange(foreign.numel())
    recv_counts = torch.bincount(local_owner[foreign], minlength=world_size).tolist()
    return TargetSwap(index, send_rows, send_counts, recv_counts, bool(cross.any()))


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without blocking the host: from pinned memory on CUDA (a non_blocking copy
    from pageable memory is synchronous)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def draw_noise(cfg, seed: int, step: int, first_index: int, micro_batch: int, rank: int, world_size: int,
               latent_shape, device, target_shape=None) -> Noise:
    """Noise keyed by (seed, optimizer step, the sample's position in the step's global batch), not
    by rank or micro-batch size, so N ranks draw exactly what one process with the same global
    batch draws. Samplers deal the global batch round-robin: rank r's i-th sample of the micro-step
    starting at position ``first_index`` (= k * micro_batch * world_size) is at
    ``first_index + i * world_size + r``.

    A counter-based RNG (``random_bits``: a hash of the sample's key and a counter, no generator
    state), vectorized: on the host, what every rank must agree on (which samples are unconditional
    and their partners: a few int64 ops per sample of the micro-step, O(global micro-batch) scalars),
    and this rank's t; on the device, eps (O(local micro-batch)), from the local keys.

    ``target_shape`` (the caption target): also the caption VE's eps of that shape, from the counters
    after z0's eps (the same keys: a pure function of the sample's position, as z0's eps)."""
    device = torch.device(device)
    b, M = micro_batch, micro_batch * world_size
    q = torch.arange(M)  # rows of the micro-step, rank-major
    keys = sample_keys(seed, step, first_index + (q % b) * world_size + q // b)  # (M, 2)
    uncond = bits_to_uniform(_scalar_draw(keys, UNCOND_COUNTER)) < cfg.uncond_prob  # (M,)
    source = unconditional_partners(uncond, _scalar_draw(keys, PARTNER_COUNTER))  # (M,)
    local = slice(rank * b, (rank + 1) * b)
    t = time_from_bits(_scalar_draw(keys[local], TIME_COUNTER), cfg)  # (b,)
    indicator = torch.where(uncond[local], UNCONDITIONAL, CONDITIONAL).long()  # (b,)
    swap = target_swap(source, rank, b, world_size)
    local_keys = _to_device(keys[local], device)  # (b, 2)
    counters = EPS_FIRST_COUNTER + torch.arange(math.prod(latent_shape), device=device)  # (E,)
    eps = bits_to_normal(random_bits(local_keys, counters)).view(b, *latent_shape)  # (b, C, H, W)
    target_eps = None
    if target_shape is not None:
        first = EPS_FIRST_COUNTER + math.prod(latent_shape)
        counters = first + torch.arange(math.prod(target_shape), device=device)  # (E_target,)
        target_eps = bits_to_normal(random_bits(local_keys, counters)).view(b, *target_shape)  # (b, C, H, W)
    swap.index, swap.send_rows = _to_device(swap.index, device), _to_device(swap.send_rows, device)
    return Noise(t=_to_device(t, device), indicator=_to_device(indicator, device), eps=eps, swap=swap,
                 target_eps=target_eps)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
    """(B,) KL(N(mu, exp(logvar)) || N(0, I)) of each sample, summed over the latent; 0 for a
    deterministic Text VE (``logvar`` None: no posterior to regularize)."""
    if logvar is None:
        return mu.new_zeros(mu.shape[0], dtype=torch.float32)
    kl = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())  # (B, C, H, W)
    return kl.flatten(1).sum(dim=1)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor | None) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)): summed over the latent, averaged over the batch."""
    return kl_per_sample(mu, logvar).mean()


def _gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows (rank-major) and this rank's offset; gradients flow back to local rows
    (backward: reduce-scatter with sum, as ``torch.distributed.nn.functional.all_gather``, which
    is deprecated)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed._functional_collectives import all_gather_single
    rows = all_gather_single(x.contiguous(), 0, dist.group.WORLD)  # (W*B, ...)
    return rows, dist.get_rank() * x.shape[0]


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


def reconstruction_loss(reconstructed: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """MSE between the features decoded from z0 and the pooled text features (B, d), averaged."""
    return F.mse_loss(reconstructed.float(), features.float())


def z0_alignment_loss(model, z0: torch.Tensor, z1: torch.Tensor, source: dict, variant: str) -> torch.Tensor:
    """z0's alignment term per ``objective.contrastive`` (paper, 70M, FID-10K): image_text, InfoNCE
    with the learned image encoder's embedding of z1 (33.41); text_text, InfoNCE with a learned
    projection of the pooled language-model features (34.67); reconstruction, MSE of a learned
    decoder from z0 back to those features (40.78). ``source``: what made z0 (text_text and
    reconstruction read its text_emb and text_mask)."""
    if variant == "image_text":
        return contrastive_loss(z0, *model.embed_image(z1))
    if variant == "text_text":
        return contrastive_loss(z0, *model.embed_text_features(source["text_emb"], source["text_mask"]))
    if variant == "reconstruction":
        return reconstruction_loss(model.reconstruct_text_features(z0),
                                   pooled_text_features(source["text_emb"], source["text_mask"]))
    raise ValueError(f"objective.contrastive must be image_text, text_text or reconstruction, got {variant!r}")


def swapped_targets(z1: torch.Tensor, swap: TargetSwap) -> torch.Tensor:
    """Each local sample's target image (b, C, H, W): its own z1 row, or for an unconditional
    sample its partner's, fetched from the rank holding it (``all_to_all_single`` of only the rows
    that cross ranks, about uncond_prob of the batch; no gradient: targets are data)."""
    if not swap.exchange:
        return z1[swap.index]
    received = z1.new_empty((sum(swap.recv_counts), *z1.shape[1:]))  # (n_recv, C, H, W)
    dist.all_to_all_single(received, z1[swap.send_rows].contiguous(), swap.recv_counts, swap.send_counts)
    return torch.cat([z1, received])[swap.index]


@dataclass
class CaptionTerms:
    mean: torch.Tensor  # (B, C, H, W): the caption VE's mean, the flow's target (detached by the caller)
    ce: torch.Tensor  # the decoder's cross-entropy on a sample of the caption VE
    kl: torch.Tensor  # the caption VE's KL


def caption_terms(model, caption, eps: torch.Tensor) -> CaptionTerms:
    """The caption autoencoder's losses: caption VE (mu, logvar) of the caption's token features,
    decoder cross-entropy on z = mu + sigma * eps against the token ids, KL to N(0, I)."""
    from trainer.models.crossflow.caption import caption_loss
    mu, logvar = model.encode_caption(caption.emb, caption.mask)  # (B, C, H, W) each
    z = mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)  # (B, C, H, W)
    logits = model.decode_caption(z)  # (B, n, vocab)
    return CaptionTerms(mean=mu, ce=caption_loss(logits, caption.ids), kl=kl_divergence(mu, logvar))


def crossflow_losses(model, z1: torch.Tensor, text_emb: torch.Tensor, text_mask: torch.Tensor, cfg, ops,
                     noise: Noise, stage: str = JOINT) -> Losses:
    """Text to image: ``flow_losses`` with the caption's text features as the source."""
    return flow_losses(model, {"text_emb": text_emb, "text_mask": text_mask}, z1, cfg, ops, noise, stage)


def flow_losses(model, source: dict, z1: torch.Tensor | None, cfg, ops, noise: Noise, stage: str = JOINT,
                caption=None, caption_kl_weight: float = 0.0) -> Losses:
    """One forward of the whole objective for a batch: z0 from ``source`` (``trainer.tasks.source_inputs``),
    towards z1 (B, C, H, W) (``trainer.tasks.target_latent``) or, for the caption target (``caption``:
    ``trainer.tasks.CaptionInputs``), towards the caption VE's mean, detached; ``noise`` (from
    ``draw_noise``) fixes every random draw; ``stage`` (``training_stage``) what it trains:
    VE_PRETRAIN runs no flow (flow_matching logged as 0, total = alignment + KL); FLOW_ONLY feeds the
    flow a detached z0 and adds the text terms with weight 0: total = flow matching, and the frozen
    text side gets gradients of exactly 0 (alignment and KL still logged). CAPTION_PRETRAIN trains the
    caption autoencoder alone (no source, no flow; flow_matching logged as 0); CAPTION_FROZEN adds its
    terms with weight 0. Exact zeros, not none: DeepSpeed ZeRO-3 keeps a parameter's last gradient
    partition when a backward gives it none, so the pre-training stage's last gradients would count
    in every later clipped norm. The caption terms (cross-entropy + caption_kl_weight * KL) add to
    the total with weight 1 otherwise."""
    cap = caption_terms(model, caption, noise.target_eps) if caption is not None else None
    if stage == CAPTION_PRETRAIN:
        zero = cap.ce.new_zeros((), dtype=torch.float32)
        return Losses(total=cap.ce + caption_kl_weight * cap.kl, flow_matching=zero, kl=zero, contrastive=zero,
                      caption_ce=cap.ce, caption_kl=cap.kl)
    if cap is not None:
        z1 = cap.mean.detach()  # (B, C, H, W): the flow's target is data to it
    z0, mu, logvar = model.encode_source(source, eps=noise.eps)  # (B, C, H, W) each
    z0_flow = z0.detach() if stage == FLOW_ONLY else z0  # what the flow starts from; frozen: no gradient back
    if stage == VE_PRETRAIN:
        fm = z0.new_zeros((), dtype=torch.float32)
    else:
        indicator, t = noise.indicator, noise.t
        target = swapped_targets(z1, noise.swap)  # (B, C, H, W); uncond targets may come from other ranks
        cond = model.text_condition(source["text_emb"], source["text_mask"]) if "text_emb" in source else None
        x_t = ops.interpolate(z0_flow, target, t, cfg.sigma_min)  # (B, C, H, W)
        v = model.velocity(x_t, t, indicator, cond)
        fm = ops.flow_matching_loss(v, z0_flow, target, cfg.sigma_min).mean()
    kl = kl_divergence(mu, logvar)
    con = z0_alignment_loss(model, z0, z1, source, cfg.contrastive) \
        if cfg.contrastive_weight > 0 and model.source_is_learned else fm.new_zeros(())
    if stage == VE_PRETRAIN:
        total = cfg.kl_weight * kl + cfg.contrastive_weight * con
    elif stage == FLOW_ONLY:
        total = fm + 0.0 * (cfg.kl_weight * kl + cfg.contrastive_weight * con)  # zero gradients to the text side
    else:
        total = fm + cfg.kl_weight * kl + cfg.contrastive_weight * con
    if cap is None:
        return Losses(total=total, flow_matching=fm, kl=kl, contrastive=con)
    caption_total = cap.ce + caption_kl_weight * cap.kl
    weight = 0.0 if stage == CAPTION_FROZEN else 1.0  # frozen: zero gradients to the caption autoencoder
    return Losses(total=total + weight * caption_total, flow_matching=fm, kl=kl, contrastive=con,
                  caption_ce=cap.ce, caption_kl=cap.kl)
