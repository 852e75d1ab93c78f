"""The training loop: one process = one rank. ``train(cfg)`` builds the pieces, runs, closes.

Each step: batch -> z1 (codec) -> objective (encode_text -> z0 -> x_t -> velocity -> losses)
-> engine.backward / engine.step (clip, AdamW, schedule, EMA). Metrics are gathered on the
device and synced to the host once per ``log_every`` steps.
"""
from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from data_pipeline.datasets import ShapesTextDataset
from data_pipeline.features import load_text_encoder
from data_pipeline.shapes import ShapesGenerator, caption as scene_caption, render
from kernels import get_ops
from trainer.checkpoint import load_file, resolve_resume, save_checkpoint, weights_payload
from trainer.config import Config, per_rank_batch_size
from trainer.engine import LocalEngine, resolve_device
from trainer.inference import Generator, build_codec, image_grid
from trainer.metrics import MetricsLogger
from trainer.models.codecs import batch_target
from trainer.models.crossflow.crossflow import CrossFlow, resolve_args
from trainer.objectives import crossflow_losses


# ----------------------------------------------------------------------------- data
@dataclass
class DataPosition:
    """Where the data stream stands: resuming from it replays exactly the batches that follow."""
    epoch: int = 0
    batch_in_epoch: int = 0


class EpochSampler(Sampler[int]):
    """A permutation of the dataset per (seed, epoch), split across ranks, starting at ``start``."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int, world_size: int, start: int = 0):
        self.n, self.seed, self.epoch, self.rank, self.world, self.start = n, seed, epoch, rank, world_size, start

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world  # every rank gets the same count
        return perm[self.rank::self.world][:per_rank][self.start:].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return self.n // self.world - self.start


def iterate_batches(dataset, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int,
                    position: DataPosition):
    """Batches forever, epoch after epoch; ``position`` is advanced as each batch is handed out."""
    while True:
        sampler = EpochSampler(len(dataset), seed, position.epoch, rank, world_size,
                               position.batch_in_epoch * batch_size)
        if len(sampler) < batch_size and position.batch_in_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one batch per rank ({batch_size})")
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=num_workers, persistent_workers=False,
                            generator=torch.Generator().manual_seed(seed + position.epoch))
        for batch in loader:
            position.batch_in_epoch += 1
            yield batch
        position.epoch += 1
        position.batch_in_epoch = 0


def build_text_encoder(cfg: Config):
    return load_text_encoder(cfg.data.text_encoder)


def build_dataset(cfg: Config, encoder) -> ShapesTextDataset:
    gen = ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "train", cfg.data.seed)
    return ShapesTextDataset(gen, cfg.data.num_samples, encoder, cfg.data.max_tokens)


def heldout_prompts(cfg: Config, n: int) -> list:
    """The first ``n`` scenes of the held-out split (attribute pairs never seen in training)."""
    gen = ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "heldout", cfg.data.seed)
    return [gen.scene(i) for i in range(n)]


# ----------------------------------------------------------------------------- model
def build_ops(name: str, device: torch.device):
    """The op implementations the model runs (``model.kernels``): auto, triton or torch."""
    return get_ops(name, device)


def build_model(cfg: Config, latent_shape, text_dim: int, device: torch.device) -> CrossFlow:
    args = resolve_args(cfg.model, latent_shape, text_dim, cfg.data.max_tokens,
                        cfg.objective.contrastive_init_temperature)
    model = CrossFlow(args)
    model.set_ops(build_ops(cfg.model.kernels, device))
    return model.to(device)


# ----------------------------------------------------------------------------- state
def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- samples
def sampling_generator(engine: LocalEngine, dataset, cfg: Config) -> Generator:
    """A copy of the model holding the EMA weights, for sample grids during and after training."""
    model = copy.deepcopy(engine.model)
    model.load_state_dict(engine.ema_state_dict())
    model.eval()
    return Generator(model, build_codec(cfg), dataset.cache, cfg, engine.device)


def write_sample_grid(gen: Generator, scenes: list, path: Path, seeds: int = 4) -> list[str]:
    """One row per prompt: the generator's own rendering of the scene, then ``seeds`` samples."""
    prompts = [scene_caption(s) for s in scenes]
    samples = [gen.generate(prompts, seed=k) for k in range(seeds)]  # seeds x B images
    rows = [[render(s, gen.config.data.resolution)] + [samples[k][i] for k in range(seeds)]
            for i, s in enumerate(scenes)]
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale=4).save(path)
    path.with_suffix(".txt").write_text("\n".join(f"row {i}: {p}" for i, p in enumerate(prompts)) + "\n")
    return prompts


def run_shapes_eval(gen: Generator, cfg: Config, out_dir: Path, step: int) -> dict[str, float]:
    """ShapesEval of the EMA weights: per-task scores, the table written beside the samples."""
    from trainer.eval.cli import sample_shapes_eval
    report = sample_shapes_eval(gen, cfg.data.max_groups, cfg.eval.images_per_prompt)
    (out_dir / "eval").mkdir(parents=True, exist_ok=True)
    (out_dir / "eval" / f"shapes_step_{step:08d}.txt").write_text(report.table() + "\n")
    return {f"shapes_eval/{k}": float(v) for k, v in report.summary().items()}


# ----------------------------------------------------------------------------- loop
def train(cfg: Config, rank: int = 0, world_size: int = 1) -> dict:
    """Train per ``cfg``; returns a summary (also written to <out_dir>/summary.json)."""
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)

    encoder = build_text_encoder(cfg)
    dataset = build_dataset(cfg, encoder)
    codec = build_codec(cfg)
    model = build_model(cfg, codec.latent_shape, encoder.dim, device)
    engine = LocalEngine(model, cfg.optim, cfg.train, device)
    batch_size = per_rank_batch_size(cfg.train.global_batch_size, world_size)

    step, position = 0, DataPosition()
    resume_from = resolve_resume(cfg.train.resume, out_dir)
    if resume_from is not None:
        engine.load_state_dict(load_file(resume_from, "state.pt", map_location=device))
        trainer_state = load_file(resume_from, "trainer.pt")
        step, position = trainer_state["step"], DataPosition(**trainer_state["data"])
        set_rng_state(trainer_state["rng"])
        print(f"resumed from {resume_from} at step {step}")
    else:
        seed_everything(cfg.train.seed + rank)  # objective noise differs per rank, data order is by sampler

    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    metrics = MetricsLogger(out_dir, cfg.train.steps, step, rank)
    batches = iterate_batches(dataset, batch_size, cfg.train.seed, rank, world_size, cfg.data.num_workers, position)
    ops = build_ops(cfg.model.kernels, device)
    totals: dict[str, torch.Tensor] = {}
    eval_shapes = cfg.eval.shapes and cfg.data.source == "shapes"
    window_start, window_steps = time.perf_counter(), 0
    history: list[dict] = []

    def save(at_step: int) -> Path:
        files = {"state.pt": engine.state_dict(),
                 "trainer.pt": {"step": at_step, "data": vars(position).copy(), "rng": rng_state()},
                 "weights.pt": weights_payload(engine.ema_state_dict(), model.args)}
        return save_checkpoint(out_dir, at_step, files, cfg.to_dict(), cfg.train.keep_last)

    model.train()
    while step < cfg.train.steps:
        batch = next(batches)
        z1 = batch_target(batch, codec).to(device, non_blocking=True)
        emb = batch["text_emb"].to(device, non_blocking=True)
        mask = batch["text_mask"].to(device, non_blocking=True)
        with engine.autocast():
            losses = crossflow_losses(model, z1, emb, mask, cfg.objective, ops)
        engine.backward(losses.total)
        grad_norm = engine.step()
        step += 1
        window_steps += 1
        for k, v in {**losses.detached(), "grad_norm": grad_norm.detach()}.items():
            totals[k] = totals.get(k, 0) + v
        metrics.advance()

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, **{("loss" if k == "total" else k): float(v) / window_steps
                                       for k, v in totals.items()},
                      "lr": engine.lr, "samples_per_s": window_steps * cfg.train.global_batch_size / elapsed,
                      "epoch": position.epoch}
            if not np.isfinite(record["loss"]):
                raise FloatingPointError(f"loss is {record['loss']} at step {step}: training diverged")
            metrics.log(record)
            history.append(record)
            totals, window_start, window_steps = {}, time.perf_counter(), 0
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
            save(step)
        if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < cfg.train.steps:
            write_sample_grid(sampling_generator(engine, dataset, cfg),
                              heldout_prompts(cfg, cfg.sample.num_prompts), out_dir / "samples" / f"step_{step:08d}.png")
            model.train()
        if eval_shapes and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
            metrics.log({"step": step, **run_shapes_eval(sampling_generator(engine, dataset, cfg), cfg, out_dir, step)})
            model.train()
    metrics.close()

    final = save(step)
    grid = out_dir / "samples" / "final.png"
    gen = sampling_generator(engine, dataset, cfg)
    write_sample_grid(gen, heldout_prompts(cfg, cfg.sample.num_prompts), grid)
    scores = run_shapes_eval(gen, cfg, out_dir, step) if eval_shapes else {}
    if scores:
        metrics.log({"step": step, **scores})
    summary = {"steps": step, "checkpoint": str(final), "samples": str(grid),
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "metrics": str(out_dir / "metrics.jsonl"), **scores}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
