"""The validation loss: a number without sampling noise, for scaling-law fits.

The training loss is noisy (every step a new batch, new t, new eps): a poor thing to fit a power
law to. ``val/loss`` is the flow-matching loss of the weights on a fixed set, at fixed times, from
fixed noise, every ``eval.val_every`` steps and at the end of training:

* **The set**: ``eval.val_samples`` samples, built once per run, before the first step. Shard data:
  the first N samples of ``data.val_path`` in stored order (``data_pipeline.readers``: the same MDS
  and WebDataset readers and S3 support as ``data.path``), checked to be the training data's kind
  (pixels or latents, their shape and scaling, the text features' width). The shapes generator: N
  scenes of a generator with its own seed (``eval.val_seed``) drawn like the training split (no
  held-out colour-shape pair: ShapesEval's held-out prompts are another matter), skipping every
  scene identical, caption and pixels, to one of the ``data.num_samples`` training scenes (with a
  different seed about 11% of scenes are: 32 px, one group, 50,000 training scenes; measured).
* **Fixed t and noise**: each sample at K = ``eval.val_t_points`` times t_i = (i + 0.5) / K, all
  from one z0 = mu + sigma * eps, eps drawn by ``trainer.objectives``' counter-based RNG keyed by
  (``eval.val_seed``, the sample's index in the set): never by the step, rank or micro-batch. Always
  conditional (no CFG drop), each sample towards its own image.
* **Logged**: ``val/loss``, the flow-matching loss averaged over samples and the t grid (what the
  fits use; a uniform grid, so it weights t uniformly, not like ``objective.time_sampler``);
  ``val/flow_matching_t<t>`` per time; ``val/kl``, the Text VE's KL on the same set (CrossFlow only);
  ``val/seconds``. No contrastive term: its negatives are the rest of the batch, so its value would
  depend on how the set is batched and split among ranks.

**The live weights, not the EMA.** A scaling study compares runs of different sizes and lengths.
The EMA lags the weights by about 1 / (1 - decay) steps (1,000 at the demo's 0.999, 10,000 at the
paper's 0.9999), a different fraction of each run, and in a short run still carries part of the
random initialization; the live weights are what the FLOPs bought and what the training loss
measures. (Samples and ShapesEval use the EMA: they judge images, not the fit.)

**Same weights, same value**: on one rank or many, for any micro-batch, run after run (up to the
last bits of float32 sums over differently shaped batches). Rank r evaluates samples r, r + W,
r + 2W, ... in batches of the training micro-batch; the sums (per time, KL, count) are all-reduced in
float64. Every rank runs the same number of forward passes (a rank with fewer samples pads with a
zero-weight row), as ZeRO-3's parameter gathers need. Validation reads no training data and draws
from no random generator, so training is unchanged by it (the golden losses hold with it on).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from data_pipeline.features import CaptionCache, TextEncoder
from data_pipeline.shapes import ShapesGenerator, depth_to_tensor_array, image_to_tensor_array
from trainer.model_input import ModelInput
from trainer.models.crossflow.flow_transformer import CONDITIONAL
from trainer.objectives import EPS_FIRST_COUNTER, bits_to_normal, kl_per_sample, random_bits, sample_keys
from trainer.tasks import TASKS, Task, source_inputs, target_latent, task_of

# The validation noise is keyed like a training sample's, with this in place of the optimizer step:
# a step no run reaches, so the two streams never share a key even when eval.val_seed = train.seed.
VAL_NOISE_STEP = 0xFFFFFFFF
# The shapes validation generator's seed is this + eval.val_seed: never a training data.seed below 2^32.
VAL_SCENE_SEED = 2**32
# Candidates the shapes validation set may skip (scenes equal to training ones) before giving up.
MAX_SKIPPED_SCENES = 100_000


# ----------------------------------------------------------------------------- the set
@dataclass
class ValidationSet:
    """This rank's share of the fixed validation set, on the CPU: rows ``index`` (positions in the
    whole set of ``size`` samples), their targets, text features and eps."""
    size: int
    index: torch.Tensor  # (n,) long
    target: dict[str, torch.Tensor]  # {"image": (n, 3, H, W)} or {"latent": (n, C, h, w)}, + the task's extras
    text_emb: torch.Tensor  # (n, L, D)
    text_mask: torch.Tensor  # (n, L) bool
    eps: torch.Tensor  # (n, C, h, w): z0 = mu + sigma * eps

    def batches(self, batch_size: int, world_size: int):
        """This rank's batches of at most ``batch_size`` rows, with ``weight`` (b,) 1 for a sample.
        Every rank yields the same number of batches: a rank out of samples yields its first row
        with weight 0."""
        per_rank = math.ceil(self.size / world_size)
        for k in range(math.ceil(per_rank / batch_size)):
            rows = slice(k * batch_size, (k + 1) * batch_size)
            weight = torch.ones(len(self.index[rows]))
            if not len(weight):
                rows, weight = slice(0, 1), torch.zeros(1)
            yield {**{key: v[rows] for key, v in self.target.items()}, "text_emb": self.text_emb[rows],
                   "text_mask": self.text_mask[rows], "eps": self.eps[rows], "weight": weight}


def validation_eps(seed: int, index: torch.Tensor, latent_shape) -> torch.Tensor:
    """(n, C, h, w) N(0, 1) draws of the validation samples at positions ``index``: the training
    noise's counter-based RNG, keyed by (seed, VAL_NOISE_STEP, position in the set)."""
    keys = sample_keys(seed, VAL_NOISE_STEP, index)  # (n, 2)
    counters = EPS_FIRST_COUNTER + torch.arange(math.prod(latent_shape))  # (E,)
    return bits_to_normal(random_bits(keys, counters)).view(len(index), *latent_shape)


def time_grid(points: int) -> list[float]:
    """The K fixed times t_i = (i + 0.5) / K: the midpoints of K equal bins of [0, 1]."""
    return [(i + 0.5) / points for i in range(points)]


def shapes_validation_generator(cfg) -> ShapesGenerator:
    """The generator the shapes validation scenes come from: the training split's distribution,
    its own seed."""
    return ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "train", VAL_SCENE_SEED + cfg.eval.val_seed)


def shapes_validation_indices(cfg) -> list[int]:
    """Indices in ``shapes_validation_generator`` of the ``eval.val_samples`` scenes of the set: the
    first ones whose caption and pixels are those of no training scene (indices below
    ``data.num_samples`` of the training generator). Costs about 66 us of CPU per training scene."""
    d = cfg.data
    training = ShapesGenerator(d.resolution, d.max_groups, "train", d.seed)
    seen = {training.fingerprint(i) for i in range(d.num_samples)}
    gen, picked = shapes_validation_generator(cfg), []
    for j in itertools.count():
        if gen.fingerprint(j) not in seen:
            picked.append(j)
            if len(picked) == cfg.eval.val_samples:
                return picked
        if j + 1 - len(picked) >= MAX_SKIPPED_SCENES:
            raise ValueError(f"the shapes validation set: {MAX_SKIPPED_SCENES} candidate scenes skipped as training "
                             f"scenes before {cfg.eval.val_samples} others were found (data.num_samples="
                             f"{d.num_samples} at data.resolution={d.resolution}); lower eval.val_samples or "
                             f"data.num_samples")


def shapes_validation_samples(cfg, rank: int, world_size: int) -> list[tuple[int, dict]]:
    """(position in the set, sample) of this rank's shapes validation samples (with the depth map
    when the task's target is depth)."""
    gen = shapes_validation_generator(cfg)
    depth = "depth" in task_of(cfg).extras
    out = []
    for k, j in enumerate(shapes_validation_indices(cfg)):
        if k % world_size == rank:
            s = gen.sample(j)
            sample = {"image": torch.from_numpy(image_to_tensor_array(s["image"])), "caption": s["caption"]}
            if depth:
                sample["depth"] = torch.from_numpy(depth_to_tensor_array(s["depth"]))  # (1, H, W)
            out.append((k, sample))
    return out


def validation_cache_dir(cfg) -> str | None:
    """Where ``s3://`` held-out shards are cached (None for a folder): ``<data.cache_dir>/validation``,
    else node-local like the training shards' (``default_cache_dir``). Never a folder per process:
    mosaicml-streaming's dataset is built collectively (a barrier) and its ranks on a node share one
    folder that the node's first rank fills; a private temporary one leaves the others waiting for
    an index that never comes (seen with 2 gloo ranks)."""
    from data_pipeline.readers import default_cache_dir
    from data_pipeline.s3 import is_remote, sync_endpoint_env
    if not is_remote(cfg.data.val_path):
        return None
    sync_endpoint_env()
    if cfg.data.cache_dir:
        return os.path.join(cfg.data.cache_dir, "validation")
    return default_cache_dir(cfg.data.val_path, cfg.data.source, cfg.train.out_dir)


def check_validation_shards(cfg, model_input: ModelInput, encoder_dim: int | None = None) -> None:
    """``data.val_path`` holds what training trains on (``resolve_model_input`` on it: its own checks
    against the config, then the same space, target shape, latent scaling and text width as the
    training data), or an error naming both."""
    from data_pipeline.metadata import read_feature_metadata
    from data_pipeline.readers import describe_shards
    from data_pipeline.s3 import is_remote
    from trainer.model_input import resolve_model_input
    path = cfg.data.val_path
    if not is_remote(path) and not Path(path).is_dir():
        raise FileNotFoundError(f"data.val_path={path}: no such folder (held-out shards for the validation loss)")
    val_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    shards = describe_shards(path, cfg.data.source, validation_cache_dir(cfg))
    val = resolve_model_input(val_cfg, shards, read_feature_metadata(path), encoder_dim)

    def kind(m: ModelInput) -> dict:
        out = {"space": m.space, "target shape": tuple(m.latent_shape), "text width": m.text_dim}
        if m.latent is not None:
            out.update(scaling_factor=m.latent.scaling_factor, shift_factor=m.latent.shift_factor)
        return out
    ours, theirs = kind(model_input), kind(val)
    differ = {k: (theirs[k], ours[k]) for k in ours if k in theirs and theirs[k] != ours[k]}
    if differ:
        raise ValueError(f"data.val_path={path} holds other data than data.path={cfg.data.path}: " + ", ".join(
            f"{k} {a} vs {b}" for k, (a, b) in differ.items()))


def shard_validation_samples(cfg, rank: int, world_size: int) -> list[tuple[int, dict]]:
    """(position in the set, sample) of this rank's samples among the first ``eval.val_samples`` of
    ``data.val_path``, in stored order (no shuffle; s3:// through ``validation_cache_dir``; with MDS
    collective: every rank builds the reader);
    a bad sample raises naming it, whatever ``data.on_error`` says: the set must be exactly the same
    in every run."""
    from data_pipeline.readers import BadDataError, read_records, record_to_sample
    path, n = cfg.data.val_path, cfg.eval.val_samples
    out, count = [], 0
    with contextlib.closing(read_records(path, cfg.data.source, validation_cache_dir(cfg))) as records:
        for i, rec in enumerate(records):
            if i == n:
                break
            count += 1
            if i % world_size != rank:
                continue
            try:
                out.append((i, record_to_sample(rec, cfg.data.resolution)))
            except Exception as e:
                raise BadDataError(f"validation shards at {path}: sample {i} (key {rec.get('key')!r}): {e}") from e
    if count < n:
        raise ValueError(f"data.val_path={path} holds {count} samples, fewer than eval.val_samples={n}")
    return out


def stack_samples(size: int, samples: list[tuple[int, dict]], encoder: TextEncoder, max_tokens: int,
                  seed: int, latent_shape, caption_ids: bool = False) -> ValidationSet:
    """A ValidationSet of (position, sample) pairs; captions without stored text features are
    embedded with ``encoder``; ``caption_ids``: their token ids too (the caption target)."""
    index = torch.tensor([i for i, _ in samples], dtype=torch.long)  # (n,)
    rows = [s for _, s in samples]
    key = "latent" if "latent" in rows[0] else "image"
    if any(key not in s for s in rows):
        raise ValueError(f"the validation samples mix images and latents (the first holds a {key})")
    if all("text_emb" in s for s in rows):
        emb, mask = torch.stack([s["text_emb"] for s in rows]), torch.stack([s["text_mask"] for s in rows])
    else:
        emb, mask = CaptionCache(encoder, max_tokens).encode([s["caption"] for s in rows])  # (n, L, D), (n, L)
    target = {name: torch.stack([s[name] for s in rows]) for name in (key, "depth") if name in rows[0]}
    if caption_ids:
        target["caption_ids"] = torch.from_numpy(encoder.token_ids([s["caption"] for s in rows], max_tokens))  # (n, L)
    return ValidationSet(size=size, index=index, target=target,
                         text_emb=emb.float(), text_mask=mask.bool(), eps=validation_eps(seed, index, latent_shape))


def build_validation_set(cfg, encoder: TextEncoder, model_input: ModelInput, rank: int,
                         world_size: int) -> ValidationSet | None:
    """This rank's share of the validation set (None when ``eval.val_every`` is 0); shards are
    checked against the training data first."""
    if not cfg.eval.val_every:
        return None
    if cfg.eval.val_samples < world_size:
        raise ValueError(f"eval.val_samples={cfg.eval.val_samples} is smaller than the world size {world_size}: "
                         f"every rank needs a validation sample")
    if cfg.data.source == "shapes":
        samples = shapes_validation_samples(cfg, rank, world_size)
    else:
        check_validation_shards(cfg, model_input, encoder.dim)
        samples = shard_validation_samples(cfg, rank, world_size)
    return stack_samples(cfg.eval.val_samples, samples, encoder, cfg.data.max_tokens, cfg.eval.val_seed,
                         model_input.latent_shape, caption_ids="caption_ids" in task_of(cfg).extras)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def validation_sums(model, ops, codec, batches, times: list[float], sigma_min: float, autocast,
                    device: torch.device, task: Task = TASKS[("text_ve", "image")], cfg=None) -> torch.Tensor:
    """(K + 2,) float64 on ``device``: this rank's weighted sums of the per-sample flow-matching
    loss at each of the K ``times``, of the per-sample KL, and of the weights (the sample count).
    Collective under ZeRO-3 (the forward passes gather parameters): every rank calls it with
    as many batches. ``task`` (and ``cfg``, read by its source inputs): z0 from the task's source,
    z1 from its target (the caption target: the caption VE's mean)."""
    K = len(times)
    sums = torch.zeros(K + 2, dtype=torch.float64, device=device)
    for batch in batches:
        z1 = target_latent(task, batch, codec, device)  # (b, C, H, W); None for the caption target
        source = source_inputs(task, batch, codec, cfg, device)
        emb = batch["text_emb"].to(device)  # (b, L, D)
        mask = batch["text_mask"].to(device)  # (b, L)
        eps = batch["eps"].to(device)  # (b, C, H, W)
        weight = batch["weight"].to(device, torch.float64)  # (b,)
        b = len(weight)
        # All K times in one velocity pass of K*b rows, time-major: K times fewer calls; no
        # gradients, so only one layer's activations live at a time (a training micro-step keeps
        # every layer's for backward).
        t = torch.tensor(times, device=device).repeat_interleave(b)  # (K*b,)
        indicator = torch.full((K * b,), CONDITIONAL, dtype=torch.long, device=device)  # (K*b,)
        with autocast():
            if z1 is None:
                z1 = model.encode_caption(emb, mask)[0]  # (b, C, H, W): the caption VE's mean
            z0, mu, logvar = model.encode_source(source, eps=eps)  # (b, C, H, W) each
            z0_k, z1_k = z0.repeat(K, 1, 1, 1), z1.repeat(K, 1, 1, 1)  # (K*b, C, H, W)
            cond = model.text_condition(emb.repeat(K, 1, 1), mask.repeat(K, 1)) \
                if task.source == "text_ve" else None  # None for CrossFlow (the baseline's text tokens)
            v = model.velocity(ops.interpolate(z0_k, z1_k, t, sigma_min), t, indicator, cond)  # (K*b, C, H, W)
            fm = ops.flow_matching_loss(v, z0_k, z1_k, sigma_min).view(K, b)  # (K, b)
            sums[:K] += (fm.double() * weight).sum(dim=1)
            sums[K] += (kl_per_sample(mu, logvar).double() * weight).sum()
        sums[K + 1] += weight.sum()
    return sums


def validation_metrics(sums: torch.Tensor, times: list[float], with_kl: bool) -> dict[str, float]:
    """The logged values from the all-reduced ``validation_sums``: means per sample."""
    K = len(times)
    per_sample = (sums / sums[K + 1]).tolist()
    out = {"val/loss": sum(per_sample[:K]) / K}
    out.update({f"val/flow_matching_t{t:.4g}": v for t, v in zip(times, per_sample[:K])})
    if with_kl:
        out["val/kl"] = per_sample[K]
    return out


class Validator:
    """The loop's handle on validation, on every rank: ``on_step(step)`` evaluates every
    ``eval.val_every`` steps, ``on_train_end`` once more at the end unless that step was just
    evaluated (or training was asked to stop); each evaluation is logged (metrics.jsonl as its own
    record with its step, W&B, the console) and kept in ``latest`` for checkpoint reports and the
    summary."""

    def __init__(self, cfg, valset: ValidationSet, engine, codec, ops, micro_batch: int, metrics):
        self.cfg, self.valset, self.engine, self.codec, self.ops = cfg, valset, engine, codec, ops
        self.micro_batch, self.metrics = micro_batch, metrics
        self.times = time_grid(cfg.eval.val_t_points)
        self.latest: dict[str, float] = {}
        self.last_step: int | None = None

    def on_step(self, step: int) -> float:
        """Evaluates when ``step`` is a multiple of ``eval.val_every``; returns the seconds spent."""
        if step % self.cfg.eval.val_every:
            return 0.0
        return self.evaluate(step)

    def on_train_end(self, step: int, stopped: bool) -> None:
        if not stopped and self.last_step != step:
            self.evaluate(step)

    def evaluate(self, step: int) -> float:
        start = time.perf_counter()
        engine, model = self.engine, self.engine.module
        training = model.training
        model.eval()
        try:
            sums = validation_sums(model, self.ops, self.codec,
                                   self.valset.batches(self.micro_batch, engine.dist.world_size), self.times,
                                   self.cfg.objective.sigma_min, engine.autocast, engine.device,
                                   task_of(self.cfg), self.cfg)
        finally:
            model.train(training)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        seconds = time.perf_counter() - start
        self.latest = {**validation_metrics(sums, self.times, model.source_is_learned), "val/seconds": seconds}
        self.last_step = step
        self.metrics.log({"step": step, **self.latest})
        return seconds


def validation_summary(validator: Validator | None) -> dict[str, float]:
    """The last validation values and their step ``val/step`` (a report after a stop request may
    come later), for checkpoint reports and summary.json; empty before the first validation."""
    if validator is None or validator.last_step is None:
        return {}
    return {**validator.latest, "val/step": validator.last_step}
