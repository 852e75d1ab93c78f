"""The training loop: one process = one rank. ``train(cfg)`` builds the pieces, runs, closes.

The same function runs as a lone process, under torchrun, or inside a Ray Train worker: the
process group comes from the environment (``trainer.engine.init_distributed``).

The pieces have their own rooms: the batch streams in ``data_pipeline.streams``; what the model is
built for (pixels or autoencoder latents, text width) in ``trainer.model_input.resolve_model_input``,
from the data's description; checkpoint state (engine, EMA, data position, RNG) in
``trainer.checkpoint``; sample grids and ShapesEval in ``trainer.observers``. This module steps.

Each optimizer step: for each of ``grad_accum`` micro-batches: batch -> the task's source inputs and
z1 (``trainer.tasks``: text features and the image's z1 for text to image) -> noise keyed by the
sample's place in the global batch -> objective (encode_source -> z0 -> x_t -> velocity -> losses)
-> DeepSpeed backward/step (clip, AdamW, schedule at the boundary) -> EMA. Loss sums stay
on the device and are reduced across ranks once per ``log_every`` steps. Then: the metrics (at
logging steps), the validation loss (every ``eval.val_every``: ``trainer.validation``), a checkpoint
(every ``ckpt_every``, reported through ``on_checkpoint`` with the latest metrics, validation's
included), the observers' ``on_step_end``.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.datasets import ShapesTextDataset
from data_pipeline.features import CaptionCache, TextEncoder, text_encoder_from_config
from data_pipeline.metadata import FeatureMetadata, read_feature_metadata
from data_pipeline.shapes import ShapesGenerator
from data_pipeline.streams import ShapesStream, ShardStream
from kernels import get_ops
from trainer.checkpoint import (agree_on_resume, check_same_input, checkpoint_root, load_checkpoint,
                                resolve_resume, save_checkpoint)
from trainer.config import Config, per_rank_batch_size
from trainer.engine import Engine, init_distributed
from trainer.metrics import MetricsLogger, peak_memory_bytes
from trainer.model_input import (ModelInput, check_init_latents, resolve_model_input, resolved_config,
                                 saved_model_input)
from trainer.models.codecs import build_codec, codec_spec
from trainer.models.families import model_from_args
from trainer.objectives import draw_noise, flow_losses, training_stage, two_stage_of
from trainer.observers import build_observers
from trainer.plan import with_target_flops
from trainer.tasks import (caption_inputs, source_inputs, target_latent, task_model_args,
                           task_of, with_flow_shape)
from trainer.validation import Validator, build_validation_set, check_validation_shards, validation_summary
from trainer.warm_start import init_from_checkpoint


class NonFiniteLossError(FloatingPointError):
    """Too many optimizer steps in a row had a NaN/Inf loss or gradient."""


# ----------------------------------------------------------------------------- data
@dataclass
class DataDescription:
    """What the data is; ``resolve_model_input(cfg, shards, metadata, encoder_dim)`` decides the model."""
    shards: dict | None  # describe_shards of data.path; None for the shapes generator
    metadata: FeatureMetadata  # the shards' crossflow_features.json (empty when absent)


def describe_data(cfg: Config) -> DataDescription:
    """The stored shapes and feature metadata of ``data.path`` (nothing to describe for shapes)."""
    if cfg.data.source == "shapes":
        return DataDescription(None, FeatureMetadata())
    from data_pipeline.readers import describe_shards
    return DataDescription(describe_shards(cfg.data.path, cfg.data.source, cfg.data.cache_dir),
                           read_feature_metadata(cfg.data.path))


def build_dataloader(cfg: Config, encoder: TextEncoder, micro_batch: int, rank: int,
                     world_size: int, pin_memory: bool = False) -> ShapesStream | ShardStream:
    """The endless, resumable batch stream of ``data.source`` (the same batch dict for every source);
    ``encoder`` embeds the shapes generator's captions; ``pin_memory``: batches in pinned host memory
    (on CUDA, so the copies to the device overlap)."""
    if cfg.data.source == "shapes":
        gen = ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "train", cfg.data.seed)
        dataset = ShapesTextDataset(gen, cfg.data.num_samples, encoder, cfg.data.max_tokens,
                                    extras=task_of(cfg).extras)  # the task's depth maps or token ids
        return ShapesStream(dataset, micro_batch, cfg.train.seed, rank, world_size, cfg.data.num_workers,
                            pin_memory)
    from data_pipeline.readers import shard_loader_from_config
    loader = shard_loader_from_config(cfg.data, micro_batch, rank=rank, world_size=world_size,
                                      seed=cfg.train.seed, out_dir=cfg.train.out_dir)
    return ShardStream(loader, pin_memory)


def caption_cache(cfg: Config, encoder: TextEncoder, stream: ShapesStream | ShardStream) -> CaptionCache:
    """Text features of sampling prompts: the shapes dataset's own cache, else a new one."""
    if isinstance(stream, ShapesStream):
        return stream.dataset.cache
    return CaptionCache(encoder, cfg.data.max_tokens)


def check_data_before_launch(cfg: Config) -> ModelInput | None:
    """Before workers start (Ray, torchrun): the shards' stored shapes and feature metadata checked
    against the config and the autoencoder folder found, so a mismatch fails once, here, naming both
    values (the text encoder's width is checked by the workers, which load it)."""
    remote = cfg.data.path.startswith("s3://")
    if cfg.data.source == "shapes" or not (remote or Path(cfg.data.path).exists()):
        return None  # a folder only the workers see: they check it
    data = describe_data(cfg)
    model_input = resolve_model_input(cfg, data.shards, data.metadata)
    codec_spec(model_input)
    if cfg.eval.val_every and (cfg.data.val_path.startswith("s3://") or Path(cfg.data.val_path).exists()):
        check_validation_shards(cfg, model_input)  # held-out shards only the workers see: they check them
    return model_input


# ----------------------------------------------------------------------------- model
def build_ops(name: str, device: torch.device):
    """The op implementations the model runs (``model.kernels``): auto, triton or torch."""
    return get_ops(name, device)


def build_model(cfg: Config, latent_shape, text_dim: int, device: torch.device,
                caption_vocab: int = 0) -> torch.nn.Module:
    """CrossFlow or the cross-attention baseline, per ``model.family``, with the task's source and
    target parts (``latent_shape``: the flow's; ``caption_vocab``: the caption target's vocabulary)."""
    model = model_from_args(task_model_args(cfg, latent_shape, text_dim, caption_vocab))
    model.set_ops(build_ops(cfg.model.kernels, device))
    return model.to(device)


# ----------------------------------------------------------------------------- loop
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def stop_agreed(local: bool, device: torch.device) -> bool:
    """True on every rank when any rank asks to stop (one small all-reduce, at logging steps only)."""
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class StepStats:
    """Loss sums kept on the device between logging intervals (no host sync per step): device
    tensors are added on the device, host floats on the host; ``reduce`` moves them once."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.steps = self.skipped = 0
        self.start = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], grad_norm) -> None:
        if grad_norm is not None:  # DeepSpeed's global norm: a device tensor (a float after a skipped step)
            losses = {**losses, "grad_norm": grad_norm}
        for k, v in losses.items():
            v = v.float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps += 1

    def reduce(self, device: torch.device) -> dict[str, float]:
        """Mean over steps and ranks: one all-reduce of one small tensor (the logging interval's sync)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        vec = torch.stack([torch.as_tensor(self.sums[k], device=device).float() for k in keys]) / max(1, self.steps)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(vec)
            vec /= dist.get_world_size()
        return {("loss" if k == "total" else k): float(v) for k, v in zip(keys, vec.tolist())}


def optimizer_step(engine: Engine, stream, observers, codec, ops, cfg: Config, model_input: ModelInput,
                   step: int, micro: int, rank: int, world: int) -> tuple[dict[str, torch.Tensor], bool]:
    """Optimizer step ``step + 1``: for each of ``grad_accum`` micro-batches, batch -> the task's
    source inputs and z1 (``trainer.tasks``) -> noise keyed by the samples' place in the global
    batch -> losses -> backward -> DeepSpeed step
    (at the boundary: clip, AdamW, schedule, EMA). Returns the losses averaged over the micro-batches
    (detached, on the device) and whether the optimizer step was applied (False: non-finite, skipped).

    Host syncs: none of ours (batches arrive pinned on CUDA, noise is drawn without reading the
    device, targets move by all-to-all with split sizes computed on the host). DeepSpeed's ZeRO
    optimizer syncs at the accumulation boundary to decide whether to skip a non-finite step
    (``applied``): see ``train.log_every``'s help and the README."""
    device, sums, task = engine.device, None, task_of(cfg)
    stage = training_stage(two_stage_of(cfg.objective, cfg.task), step)
    for k in range(cfg.train.grad_accum):
        batch = next(stream)
        for observer in observers:
            observer.on_batch(batch)
        z1 = target_latent(task, batch, codec, device)  # (B, C, H, W); None for the caption target
        source = source_inputs(task, batch, codec, cfg, device)
        caption = caption_inputs(task, batch, device)  # the caption target's features and ids, else None
        noise = draw_noise(cfg.objective, cfg.train.seed, step, k * micro * world, micro, rank, world,
                           model_input.latent_shape, device,
                           target_shape=model_input.latent_shape if caption is not None else None)
        with engine.autocast():
            losses = flow_losses(engine.module, source, z1, cfg.objective, ops, noise, stage, caption,
                                 cfg.task.caption_kl_weight)
        engine.backward(losses.total)
        applied = engine.step()
        d = losses.detached()
        sums = d if sums is None else {n: sums[n] + d[n] for n in d}
    return {n: v / cfg.train.grad_accum for n, v in sums.items()}, applied


def train(cfg: Config, on_checkpoint=None, resume_from: Path | list[Path] | None = None,
          should_stop=None) -> dict:
    """Train per ``cfg`` as this process's rank; returns a summary (rank 0 writes summary.json).

    on_checkpoint(step, checkpoint_dir, last_metrics): called on every rank after each complete
        checkpoint (e.g. to report it to Ray Train); it observes, it must not change training.
    resume_from: a checkpoint directory to resume from, overriding ``train.resume``; or a list of
        candidates (a launcher's restart), of which the ranks agree on the newest all can read.
    should_stop(): polled at each logging step (e.g. a launcher's Ctrl-C); when any rank says True,
        all stop together, write a final checkpoint and return with ``summary["stopped"]``.
    """
    info = init_distributed(cfg.train.device)
    rank, world, device = info.rank, info.world_size, info.device
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank

    micro = per_rank_batch_size(cfg.train.global_batch_size, world, cfg.train.grad_accum)
    encoder = text_encoder_from_config(cfg.data)
    data = describe_data(cfg)
    stream = build_dataloader(cfg, encoder, micro, rank, world, pin_memory=device.type == "cuda")
    captions = caption_cache(cfg, encoder, stream)
    task = task_of(cfg)
    model_input = with_flow_shape(cfg, resolve_model_input(cfg, data.shards, data.metadata, encoder.dim))
    cfg = resolved_config(cfg, model_input)  # what config.json and checkpoints record
    features = FeatureMetadata(model_input.latent, data.metadata.text)
    codec = build_codec(model_input, device=device)  # fails now, not at the first grid, without an autoencoder
    valset = build_validation_set(cfg, encoder, model_input, rank, world)  # None without eval.val_every
    model = build_model(cfg, model_input.latent_shape, model_input.text_dim, device,
                        encoder.vocab_size if task.target == "caption" else 0)
    cfg = with_target_flops(cfg, model.flops_per_sample(), announce=rank == 0)  # train.target_flops -> steps
    if cfg.train.init_from:  # every rank refuses a checkpoint trained on other latents (metadata only)
        check_init_latents(saved_model_input(cfg.train.init_from), model_input, cfg.train.init_from)
    if cfg.train.init_from and rank == 0:  # another run's weights (a resume below overrides them); only
        resized = init_from_checkpoint(model, cfg.train.init_from)  # rank 0 reads: DeepSpeed broadcasts them
        print(f"initialized from {cfg.train.init_from} (resized: {', '.join(resized) or 'none'})", flush=True)
    engine = Engine(model, cfg.train, cfg.optim, micro, info, two_stage_of(cfg.objective, cfg.task))
    module = engine.module

    step = 0
    if isinstance(resume_from, list):
        resume_from = agree_on_resume(resume_from, rank)  # every rank calls it, even with none
    resume_from = resume_from or resolve_resume(cfg.train.resume, out_dir)
    if resume_from is not None:
        check_same_input(resume_from, model_input)
        step = load_checkpoint(engine, stream, resume_from, rank)
        if rank == 0:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    else:
        seed_everything(cfg.train.seed + rank)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    metrics = MetricsLogger(out_dir, cfg.log, cfg.to_dict(), cfg.train.steps, step, rank)
    observers = build_observers(cfg, engine, codec, captions, metrics, rank)  # the task's grids and metrics
    ops = build_ops(cfg.model.kernels, device)
    validator = Validator(cfg, valset, engine, codec, ops, micro, metrics) if valset is not None else None
    flops_per_sample = module.flops_per_sample()
    tokens_per_sample = 1 + model_input.image_tokens(module.args.patch_size)
    peak = cfg.log.peak_tflops * 1e12 or (989e12 if device.type == "cuda" else 0.0)
    history: list[dict] = []
    stats, skipped_total, skipped_in_row = StepStats(), 0, 0
    stopped = False

    module.train()
    try:
        while step < cfg.train.steps:
            losses, applied = optimizer_step(engine, stream, observers, codec, ops, cfg, model_input, step, micro,
                                             rank, world)
            step += 1
            metrics.advance()
            if applied:
                skipped_in_row = 0
                stats.add(losses, engine.grad_norm())
            else:
                skipped_total += 1
                skipped_in_row += 1
                stats.skipped += 1
                if skipped_in_row >= cfg.train.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"{skipped_in_row} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                        f"gradient and were skipped; stopping. The last checkpoint in {checkpoint_root(out_dir)} "
                        f"predates them and is intact. Lower optim.lr, check the data, or resume from it.")

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - stats.start
                record = {"step": step, **stats.reduce(device), "lr": engine.lr, "skipped_steps": skipped_total}
                sps = (stats.steps + stats.skipped) * cfg.train.global_batch_size / elapsed
                record.update(samples_per_s=sps, tokens_per_s=sps * tokens_per_sample,
                              flops_per_sample=flops_per_sample,
                              peak_memory_gb=peak_memory_bytes(device) / 2**30)
                if peak:
                    record["mfu"] = flops_per_sample * sps / (peak * world)
                metrics.log(record)
                if "loss" in record:
                    history.append(record)
                stats = StepStats()
            if validator is not None:  # before the checkpoint, whose report carries it; not in samples_per_s
                stats.start += validator.on_step(step)
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
                ckpt = save_checkpoint(engine, stream, cfg, step, rank, features)
                if on_checkpoint is not None:
                    on_checkpoint(step, ckpt, {**(history[-1] if history else {}), **validation_summary(validator)})
            for observer in observers:
                observer.on_step_end(step)
            if should_stop is not None and step % cfg.train.log_every == 0 and step < cfg.train.steps:
                if stop_agreed(should_stop(), device):
                    stopped = True
                    break

        if validator is not None:
            validator.on_train_end(step, stopped)
        final = save_checkpoint(engine, stream, cfg, step, rank, features)
        if on_checkpoint is not None:
            on_checkpoint(step, final, {**(history[-1] if history else {}), **validation_summary(validator)})
        for observer in observers:
            observer.on_train_end(step, stopped)
    finally:
        metrics.close()
        stream.close()
    scores = {k: v for observer in observers for k, v in observer.summary().items()}
    summary = {"steps": step, "stopped": stopped, "checkpoint": str(final),
               "samples": str(out_dir / "samples" / "final.png"), "skipped_steps": skipped_total,
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "metrics": str(out_dir / "metrics.jsonl"), **scores, **validation_summary(validator)}
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
