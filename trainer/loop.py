"""The training loop: one process = one rank. ``train(cfg)`` builds the pieces, runs, closes.

The same function runs as a lone process, under torchrun, or inside a Ray Train worker: the
process group comes from the environment (``trainer.engine.init_distributed``).

What the model is built for (pixels or autoencoder latents, text width) is decided once, by
``trainer.model_input.resolve_model_input`` from the data's description; the codec it implies
decodes every sample grid.

Each optimizer step: for each of ``grad_accum`` micro-batches: batch -> z1 (codec) -> noise keyed
by the sample's place in the global batch -> objective (encode_text -> z0 -> x_t -> velocity ->
losses) -> DeepSpeed backward/step (clip, AdamW, schedule at the boundary) -> EMA. Loss sums stay
on the device and are reduced across ranks once per ``log_every`` steps.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from data_pipeline.datasets import ShapesTextDataset
from data_pipeline.features import CaptionCache, text_encoder_from_config
from data_pipeline.metadata import FeatureMetadata, read_feature_metadata, write_feature_metadata
from data_pipeline.shapes import ShapesGenerator, caption as scene_caption, render
from kernels import get_ops
from trainer.checkpoint import (STEP_DIR, WEIGHTS_FILE, checkpoint_root, commit_checkpoint, load_file,
                                prepare_checkpoint, resolve_resume, save_weights, tmp_tag, write_torch)
from trainer.config import Config, per_rank_batch_size
from trainer.engine import Engine, init_distributed
from trainer.inference import Generator, image_grid
from trainer.metrics import MetricsLogger, peak_memory_bytes
from trainer.model_input import (ModelInput, check_init_latents, check_same_latents, resolve_model_input,
                                 resolved_config, saved_model_input)
from trainer.models.codecs import batch_target, build_codec, codec_spec
from trainer.models.families import model_from_args, resolve_model_args
from trainer.objectives import crossflow_losses, draw_noise
from trainer.warm_start import init_from_checkpoint

# Fault injection for the atomic-save test: SIGKILL this process inside a save of that step.
KILL_IN_SAVE_ENV = "CROSSFLOW_FAULT_KILL_IN_SAVE"


class NonFiniteLossError(FloatingPointError):
    """Too many optimizer steps in a row had a NaN/Inf loss or gradient."""


# ----------------------------------------------------------------------------- data
@dataclass
class DataPosition:
    """Where the shapes stream stands: resuming from it replays exactly the batches that follow."""
    epoch: int = 0
    batch_in_epoch: int = 0


class EpochSampler(Sampler[int]):
    """A permutation per (seed, epoch), dealt round-robin to ranks, starting at ``start``."""

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


class ShapesStream:
    """The synthetic shapes dataset as an endless, resumable stream of batches."""

    def __init__(self, dataset: ShapesTextDataset, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int):
        self.dataset, self.position = dataset, DataPosition()
        self._args = (dataset, batch_size, seed, rank, world_size, num_workers)
        self._it = None

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iterate_batches(*self._args, self.position)
        return next(self._it)

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "batch_in_epoch": self.position.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self._it = DataPosition(**state), None


class ShardStream:
    """MDS or WebDataset shards (local or s3://) as an endless, resumable stream of batches."""

    def __init__(self, loader):
        from data_pipeline.readers import iterate_forever
        self.loader, self._iterate = loader, iterate_forever
        self._it = None

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._iterate(self.loader)
        return next(self._it)

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None


@dataclass
class DataBundle:
    """What the data is; ``resolve_model_input(cfg, shards, metadata, encoder_dim)`` decides the model."""
    stream: ShapesStream | ShardStream
    captions: CaptionCache  # text features for sampling prompts
    shards: dict | None  # describe_shards of data.path; None for the shapes generator
    metadata: FeatureMetadata  # the shards' crossflow_features.json (empty when absent)
    encoder_dim: int  # width of data.text_encoder's features


def build_dataloader(cfg: Config, micro_batch: int, rank: int, world_size: int) -> DataBundle:
    """The batch stream of ``data.source`` (same batch dict for every source), a description of the
    data (stored shapes, feature metadata, encoder width) and a caption cache for sampling."""
    encoder = text_encoder_from_config(cfg.data)
    captions = CaptionCache(encoder, cfg.data.max_tokens)
    if cfg.data.source == "shapes":
        gen = ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "train", cfg.data.seed)
        dataset = ShapesTextDataset(gen, cfg.data.num_samples, encoder, cfg.data.max_tokens)
        stream = ShapesStream(dataset, micro_batch, cfg.train.seed, rank, world_size, cfg.data.num_workers)
        return DataBundle(stream, dataset.cache, None, FeatureMetadata(), encoder.dim)
    from data_pipeline.readers import describe_shards, shard_loader_from_config
    shards = describe_shards(cfg.data.path, cfg.data.source, cfg.data.cache_dir)
    metadata = read_feature_metadata(cfg.data.path)
    loader = shard_loader_from_config(cfg.data, micro_batch, rank=rank, world_size=world_size,
                                      seed=cfg.train.seed, out_dir=cfg.train.out_dir)
    return DataBundle(ShardStream(loader), captions, shards, metadata, encoder.dim)


def check_data_before_launch(cfg: Config) -> ModelInput | None:
    """Before workers start (Ray, torchrun): the shards' stored shapes and feature metadata checked
    against the config and the autoencoder folder found, so a mismatch fails once, here, naming both
    values (the text encoder's width is checked by the workers, which load it)."""
    remote = cfg.data.path.startswith("s3://")
    if cfg.data.source == "shapes" or not (remote or Path(cfg.data.path).exists()):
        return None  # a folder only the workers see: they check it
    from data_pipeline.readers import describe_shards
    shards = describe_shards(cfg.data.path, cfg.data.source, cfg.data.cache_dir)
    model_input = resolve_model_input(cfg, shards, read_feature_metadata(cfg.data.path))
    codec_spec(model_input)
    return model_input


def heldout_prompts(cfg: Config, n: int) -> list:
    """The first ``n`` scenes of the held-out split (attribute pairs never seen in training)."""
    gen = ShapesGenerator(cfg.data.resolution, cfg.data.max_groups, "heldout", cfg.data.seed)
    return [gen.scene(i) for i in range(n)]


# ----------------------------------------------------------------------------- model
def build_ops(name: str, device: torch.device):
    """The op implementations the model runs (``model.kernels``): auto, triton or torch."""
    return get_ops(name, device)


def build_model(cfg: Config, latent_shape, text_dim: int, device: torch.device) -> torch.nn.Module:
    """CrossFlow or the cross-attention baseline, per ``model.family``."""
    args = resolve_model_args(cfg.model, latent_shape, text_dim, cfg.data.max_tokens,
                              cfg.objective.contrastive_init_temperature)
    model = model_from_args(args)
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


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(engine: Engine, stream, cfg: Config, step: int, rank: int,
                    features: FeatureMetadata | None = None) -> Path:
    """Collective: every rank writes its part into a temporary directory; rank 0 commits it.
    ``features``: how the training data's latents and text features were made (sampling finds the
    autoencoder in it)."""
    out_dir = Path(cfg.train.out_dir)
    if rank == 0:
        prepare_checkpoint(out_dir, step)
    barrier()
    tmp = checkpoint_root(out_dir) / tmp_tag(step)
    engine.save(str(checkpoint_root(out_dir)), tmp_tag(step))  # DeepSpeed: model + ZeRO optimizer shards
    if os.environ.get(KILL_IN_SAVE_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    write_torch(tmp / f"rng_rank{rank}.pt", rng_state())
    ema = engine.ema_state_for_rank()
    if ema is not None:
        write_torch(tmp / (f"ema_rank{rank}.pt" if engine.zero_stage == 3 else "ema.pt"), ema)
    weights = engine.ema_full_state_dict()  # collective under ZeRO-3
    if rank == 0:
        write_torch(tmp / "trainer.pt", {"step": step, "data": stream.state_dict()})
        features = features or FeatureMetadata()
        save_weights(tmp / WEIGHTS_FILE, weights, engine.module.args, cfg.to_dict(), features=features.to_dict())
        write_feature_metadata(tmp, features)
    barrier()
    final = checkpoint_root(out_dir) / f"step_{step:08d}"
    if rank == 0:
        final = commit_checkpoint(out_dir, step, cfg.to_dict(), cfg.train.keep_last)
    barrier()
    return final


def load_checkpoint(engine: Engine, stream, ckpt: Path, rank: int) -> int:
    engine.load(str(ckpt.parent), ckpt.name)
    state = load_file(ckpt, "trainer.pt")
    stream.load_state_dict(state["data"])
    set_rng_state(load_file(ckpt, f"rng_rank{rank}.pt"))
    if engine.ema is not None:
        name = f"ema_rank{rank}.pt" if engine.zero_stage == 3 else "ema.pt"
        engine.ema.load_state_dict(load_file(ckpt, name, map_location=engine.device))
    return int(state["step"])


# ----------------------------------------------------------------------------- samples & eval
class SeenSamples:
    """The first ``limit`` training samples' captions and targets (stored latent or image, on the
    CPU): prompts and reference column of the sample grids for shard data."""

    def __init__(self, limit: int):
        self.limit, self.captions, self.targets = limit, [], []

    def add(self, batch: dict) -> None:
        take = self.limit - len(self.captions)
        if take <= 0:
            return
        self.captions += list(batch["caption"])[:take]
        target = batch["latent"] if "latent" in batch else batch.get("image")
        if target is not None:
            self.targets += list(target[:take].detach().cpu())  # each (C, h, w)


def sample_grid_rows(gen: Generator, prompts: list[str], references: list | None, seeds: int = 4) -> list:
    samples = [gen.generate(prompts, seed=k) for k in range(seeds)]  # seeds x B images
    return [([references[i]] if references else []) + [samples[k][i] for k in range(seeds)]
            for i in range(len(prompts))]


def reference_images(gen: Generator, seen: SeenSamples, n: int, side: int) -> list[np.ndarray] | None:
    """The stored samples behind the first ``n`` seen captions as (side, side, 3) uint8 images: a latent
    decoded by the codec, an image as it is; resized to the samples' side."""
    if len(seen.targets) < n:
        return None
    from PIL import Image
    images = gen.images(torch.stack(seen.targets[:n]))  # (n, C, h, w) -> n x (H, W, 3)
    return [im if im.shape[0] == side else np.asarray(Image.fromarray(im).resize((side, side), Image.BICUBIC))
            for im in images]


def write_samples(engine: Engine, data: DataBundle, cfg: Config, codec, path: Path, rank: int,
                  seen: SeenSamples) -> None:
    """One row per prompt (``sample.prompts_file``, else held-out shapes scenes with the generator's own
    rendering first, else captions seen in training with their stored sample, decoded, first), then 4
    EMA samples decoded by ``codec``. Collective under ZeRO-3 (every rank runs the forward passes);
    rank 0 writes."""
    refs = None
    if cfg.sample.prompts_file:
        lines = Path(cfg.sample.prompts_file).read_text().splitlines()
        prompts = [line.strip() for line in lines if line.strip()][:cfg.sample.num_prompts]
    elif cfg.data.source == "shapes":
        scenes = heldout_prompts(cfg, cfg.sample.num_prompts)
        prompts = [scene_caption(s) for s in scenes]
        refs = [render(s, cfg.data.resolution) for s in scenes]
    else:
        prompts = seen.captions[:cfg.sample.num_prompts]
    with engine.ema_weights() as model:
        model.eval()
        gen = Generator(model, codec, data.captions, cfg, engine.device)
        rows = sample_grid_rows(gen, prompts, refs)
        if refs is None and not cfg.sample.prompts_file:
            refs = reference_images(gen, seen, len(prompts), rows[0][0].shape[0])
            rows = [[refs[i]] + row for i, row in enumerate(rows)] if refs else rows
        model.train()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(rows, scale=4).save(path)
        path.with_suffix(".txt").write_text("\n".join(f"row {i}: {p}" for i, p in enumerate(prompts)) + "\n")


def run_shapes_eval(engine: Engine, data: DataBundle, cfg: Config, codec, step: int, rank: int) -> dict[str, float]:
    """ShapesEval of the EMA weights (collective under ZeRO-3); rank 0 writes the table."""
    from trainer.eval.cli import sample_shapes_eval
    with engine.ema_weights() as model:
        model.eval()
        gen = Generator(model, codec, data.captions, cfg, engine.device)
        report = sample_shapes_eval(gen, cfg.data.max_groups, cfg.eval.images_per_prompt)
        model.train()
    if rank == 0:
        out = Path(cfg.train.out_dir) / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"shapes_step_{step:08d}.txt").write_text(report.table() + "\n")
    return {f"shapes_eval/{k}": float(v) for k, v in report.summary().items()}


# ----------------------------------------------------------------------------- loop
def stop_agreed(local: bool, device: torch.device) -> bool:
    """True on every rank when any rank asks to stop (one small all-reduce, at logging steps only)."""
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


class StepStats:
    """Loss sums kept on the device between logging intervals (no host sync per step)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.skipped = 0
        self.start = time.perf_counter()

    def add(self, losses: dict[str, torch.Tensor], grad_norm) -> None:
        if grad_norm is not None:  # DeepSpeed's global norm: a float or a device tensor
            losses = {**losses, "grad_norm": torch.as_tensor(grad_norm, device=next(iter(losses.values())).device)}
        for k, v in losses.items():
            self.sums[k] = self.sums.get(k, 0) + v.float()
        self.steps += 1

    def reduce(self) -> dict[str, float]:
        """Mean over steps and ranks: one all-reduce of one small tensor."""
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k] for k in keys]) / max(1, self.steps) if keys else torch.zeros(0)
        if dist.is_initialized() and dist.get_world_size() > 1 and keys:
            dist.all_reduce(vec)
            vec /= dist.get_world_size()
        return {("loss" if k == "total" else k): float(v) for k, v in zip(keys, vec.tolist())}


def check_same_input(ckpt: Path, current: ModelInput) -> None:
    """A checkpoint trained on other latents (or pixels) than this run's data is refused, naming both."""
    if (Path(ckpt) / WEIGHTS_FILE).is_file():  # else load_checkpoint names what is missing
        check_same_latents(saved_model_input(ckpt), current, str(ckpt))


def checkpoint_step(ckpt: Path) -> int:
    """The step a checkpoint directory holds: from its ``step_N`` name, else from its trainer.pt."""
    m = STEP_DIR.match(ckpt.name)
    return int(m.group(1)) if m else int(load_file(ckpt, "trainer.pt")["step"])


def agree_on_resume(candidates: list[Path], rank: int) -> Path | None:
    """Collective: of the candidate checkpoints, the newest one that every rank can read (its
    trainer.pt and this rank's RNG file present); this rank's path to it, or None when the ranks
    share none. Candidates may differ per rank (a node-local copy, Ray's downloaded one)."""
    mine: dict[int, Path] = {}
    for ckpt in candidates:
        if (ckpt / "trainer.pt").is_file() and (ckpt / f"rng_rank{rank}.pt").is_file():
            mine.setdefault(checkpoint_step(ckpt), ckpt)  # earlier candidates win a tie
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, sorted(mine))
    common = set.intersection(*(set(v) for v in views))
    return mine[max(common)] if common else None


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
    data = build_dataloader(cfg, micro, rank, world)
    model_input = resolve_model_input(cfg, data.shards, data.metadata, data.encoder_dim)
    cfg = resolved_config(cfg, model_input)  # what config.json and checkpoints record
    features = FeatureMetadata(model_input.latent, data.metadata.text)
    codec = build_codec(model_input, device=device)  # fails now, not at the first grid, without an autoencoder
    model = build_model(cfg, model_input.latent_shape, model_input.text_dim, device)
    if cfg.train.init_from:  # every rank refuses a checkpoint trained on other latents (metadata only)
        check_init_latents(saved_model_input(cfg.train.init_from), model_input, cfg.train.init_from)
    if cfg.train.init_from and rank == 0:  # another run's weights (a resume below overrides them); only
        resized = init_from_checkpoint(model, cfg.train.init_from)  # rank 0 reads: DeepSpeed broadcasts them
        print(f"initialized from {cfg.train.init_from} (resized: {', '.join(resized) or 'none'})", flush=True)
    engine = Engine(model, cfg.train, cfg.optim, micro, info)
    module = engine.module

    step = 0
    if isinstance(resume_from, list):
        resume_from = agree_on_resume(resume_from, rank)  # every rank calls it, even with none
    resume_from = resume_from or resolve_resume(cfg.train.resume, out_dir)
    if resume_from is not None:
        check_same_input(resume_from, model_input)
        step = load_checkpoint(engine, data.stream, resume_from, rank)
        if rank == 0:
            print(f"resumed from {resume_from} at step {step}", flush=True)
    else:
        seed_everything(cfg.train.seed + rank)
    if rank == 0:
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    metrics = MetricsLogger(out_dir, cfg.log, cfg.to_dict(), cfg.train.steps, step, rank)
    ops = build_ops(cfg.model.kernels, device)
    flops_per_sample = module.flops_per_sample()
    tokens_per_sample = 1 + model_input.image_tokens(module.args.patch_size)
    peak = cfg.log.peak_tflops * 1e12 or (989e12 if device.type == "cuda" else 0.0)
    eval_shapes = cfg.eval.shapes and cfg.data.source == "shapes"
    history: list[dict] = []
    stats, skipped_total, skipped_in_row = StepStats(), 0, 0
    seen = SeenSamples(cfg.sample.num_prompts)
    stopped = False

    module.train()
    try:
        while step < cfg.train.steps:
            micro_losses = None
            for k in range(cfg.train.grad_accum):
                batch = next(data.stream)
                seen.add(batch)
                z1 = batch_target(batch, codec).to(device, non_blocking=True)
                emb = batch["text_emb"].to(device, non_blocking=True)
                mask = batch["text_mask"].to(device, non_blocking=True)
                noise = draw_noise(cfg.objective, cfg.train.seed, step, k * micro * world, micro, rank, world,
                                   model_input.latent_shape, device)
                with engine.autocast():
                    losses = crossflow_losses(module, z1, emb, mask, cfg.objective, ops, noise)
                if step + 1 in cfg.train.inject_nan_steps:
                    losses.total = losses.total * float("nan")
                engine.backward(losses.total)
                applied = engine.step()
                d = losses.detached()
                micro_losses = d if micro_losses is None else {n: micro_losses[n] + d[n] for n in d}
            step += 1
            metrics.advance()
            if applied:
                skipped_in_row = 0
                stats.add({n: v / cfg.train.grad_accum for n, v in micro_losses.items()}, engine.grad_norm())
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
                record = {"step": step, **stats.reduce(), "lr": engine.lr, "skipped_steps": skipped_total}
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
            if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
                ckpt = save_checkpoint(engine, data.stream, cfg, step, rank, features)
                if on_checkpoint is not None:
                    on_checkpoint(step, ckpt, history[-1] if history else {})
            if cfg.train.sample_every and step % cfg.train.sample_every == 0 and step < cfg.train.steps:
                grid = out_dir / "samples" / f"step_{step:08d}.png"
                write_samples(engine, data, cfg, codec, grid, rank, seen)
                metrics.log_image(grid, step)
            if eval_shapes and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.steps:
                metrics.log({"step": step, **run_shapes_eval(engine, data, cfg, codec, step, rank)})
            if should_stop is not None and step % cfg.train.log_every == 0 and step < cfg.train.steps:
                if stop_agreed(should_stop(), device):
                    stopped = True
                    break

        final = save_checkpoint(engine, data.stream, cfg, step, rank, features)
        if on_checkpoint is not None:
            on_checkpoint(step, final, history[-1] if history else {})
        grid = out_dir / "samples" / "final.png"
        if not stopped:  # a stop request wants the checkpoint, not the minutes of sampling
            write_samples(engine, data, cfg, codec, grid, rank, seen)
            metrics.log_image(grid, step)
        scores = run_shapes_eval(engine, data, cfg, codec, step, rank) if eval_shapes and not stopped else {}
        if scores:
            metrics.log({"step": step, **scores})
    finally:
        metrics.close()
    summary = {"steps": step, "stopped": stopped, "checkpoint": str(final), "samples": str(grid),
               "skipped_steps": skipped_total,
               "first_loss": history[0]["loss"] if history else None,
               "final_loss": history[-1]["loss"] if history else None,
               "metrics": str(out_dir / "metrics.jsonl"), **scores}
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
