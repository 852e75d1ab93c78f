"""Typed configuration: one small dataclass per component, values from YAML, dotted overrides.

``load_config("configs/demo.yaml", ["optim.lr=3e-4", "train.steps=200"])`` returns a validated
:class:`Config`. Unknown keys and values of the wrong type fail at start-up with a
:class:`ConfigError` that names the key, before any data is read or any worker starts.
Every field carries a one-line help text (``metadata["help"]``), shown by ``crossflow config``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from data_pipeline.metadata import DEFAULT_MAX_TOKENS


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the key."""


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    family: str = _f("crossflow", "crossflow (flow from the text's latent) or cross_attention_fm (the paper's baseline: "
                                  "flow from noise, text by cross-attention; same presets, no Text VE)")
    preset: str = _f("tiny", "size preset from trainer.models.crossflow.presets (tiny, 70M, 150M, 300M, 500M, 0.95B)")
    hidden_size: int | None = _f(None, "flow transformer width; overrides the preset when set")
    depth: int | None = _f(None, "number of flow transformer blocks; overrides the preset when set")
    head_dim: int | None = _f(None, "attention head dimension (64 or 128); overrides the preset when set")
    patch_size: int | None = _f(None, "patch side in latent pixels; overrides the preset when set")
    mlp_ratio: float = _f(4.0, "MLP hidden width as a multiple of the model width")
    prediction: str = _f("velocity", "what the flow network outputs: velocity (v = z1 - z0, the paper's) or x1 (the end "
                                     "point, turned into (x1 - x_t) / (1 - t): JiT's x-prediction, same loss and sampler)")
    pos_embed: str = _f("sincos", "2D position embedding of the patches: sincos (fixed) or learned")
    text_ve_width: int | None = _f(None, "Text VE transformer width; overrides the preset when set")
    text_ve_depth: int | None = _f(None, "Text VE transformer layers; overrides the preset when set")
    text_ve_reduced_width: int | None = _f(None, "per-token width after the VE's halving reduction layers; overrides the preset")
    text_ve_dropout: float = _f(0.0, "dropout inside the Text VE transformer (the reimplementation uses 0.1)")
    text_proj_dim: int = _f(0, "learned MLP projecting the text features to this width before the Text VE (or the "
                               "baseline's cross-attention); the reimplementation: 1024 for T5-XXL's 4096; 0 = none")
    image_encoder_width: int = _f(32, "base channel count of the contrastive image encoder (a small CNN)")
    text_ve: str = _f("variational", "variational (mu, logvar, z0 = mu + sigma eps) or deterministic (the paper's plain-"
                                     "encoder ablation: the same trunk outputs z0; no sampling, KL 0 so kl_weight is unused)")
    kernels: str = _f("auto", "op implementation: auto (CUDA: Triton where kernels/auto_table.json measured it "
                              "correct and faster on this GPU class, PyTorch elsewhere), triton, torch")

    def validate(self) -> None:
        from trainer.models.crossflow.presets import PRESETS
        _choice("model.family", self.family, ("crossflow", "cross_attention_fm"))  # trainer.models.families
        _choice("model.preset", self.preset, tuple(PRESETS))
        _choice("model.pos_embed", self.pos_embed, ("sincos", "learned"))
        _choice("model.prediction", self.prediction, ("velocity", "x1"))
        _choice("model.kernels", self.kernels, ("auto", "triton", "torch"))
        _choice("model.text_ve", self.text_ve, ("variational", "deterministic"))
        if self.head_dim is not None:
            _choice("model.head_dim", self.head_dim, (64, 128))
        for name in ("hidden_size", "depth", "patch_size", "text_ve_width", "text_ve_depth", "text_ve_reduced_width"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"model.{name} must be positive, got {v}")
        if self.text_proj_dim < 0:
            raise ConfigError(f"model.text_proj_dim must be >= 0 (0 = no projection), got {self.text_proj_dim}")
        if not 0.0 <= self.text_ve_dropout < 1.0:
            raise ConfigError(f"model.text_ve_dropout must be in [0, 1), got {self.text_ve_dropout}")


@dataclass
class DataConfig:
    source: str = _f("shapes", "where samples come from: shapes (the synthetic generator), mds or wds (shards at data.path)")
    path: str = _f("", "mds/wds: shard folder or s3://bucket/prefix (endpoint and keys from S3_ENDPOINT_URL/AWS_* variables)")
    val_path: str = _f("", "mds/wds: held-out shards of the validation loss (eval.val_every), same format as data.path, "
                           "folder or s3://; the first eval.val_samples, in stored order")
    cache_dir: str | None = _f(None, "mds/wds: local cache for s3:// shards (default: node-local, $CROSSFLOW_CACHE_DIR or the temp folder)")
    shuffle: bool = _f(True, "mds/wds: shuffle samples each epoch (seeded by train.seed and the epoch)")
    on_error: str = _f("raise", "mds/wds: a bad sample or shard: raise (error naming it) or skip (drop and count)")
    resolution: int = _f(32, "image side in pixels")
    max_groups: int = _f(1, "shapes: 1 = one group of shapes per image, 2 = also 'X on the left and Y on the right'")
    num_samples: int = _f(50_000, "shapes: number of distinct training scenes (the epoch length)")
    seed: int = _f(0, "shapes: generator seed (changes every scene)")
    text_encoder: str = _f("minilm", "minilm (packaged all-MiniLM-L6-v2) or a local transformers "
                                     "folder: CLIP or CLIP-text (its text tower), T5 or T5-encoder (its encoder), any encoder-only model")
    max_tokens: int = _f(DEFAULT_MAX_TOKENS, "text tokens per caption (padded or truncated); the Text VE flattens this many")
    text_hidden_layer: int = _f(-1, "text encoder layer whose states are the features: -1 last (after the final norm), -2 penultimate, ...")
    text_multiplier: float = _f(1.0, "text features are multiplied by this (the reimplementation's T5-XXL uses 10)")
    text_dim: int = _f(0, "width of the text features (384 MiniLM, 768 CLIP ViT-L/14, 4096 T5-XXL); 0 = from the "
                          "shards or the text encoder; when set, shards and encoder must agree with it")
    space: str = _f("auto", "what the flow carries z0 to: pixels (the image), latent (an AutoencoderKL latent stored "
                            "in the shards; super-resolution: encoded from the images by data.vae) or auto "
                            "(latent when the shards hold latents, else pixels)")
    vae: str = _f("", "local diffusers AutoencoderKL folder that decodes latents to images (super-resolution: "
                      "also encodes them); empty = the one named in the shards' metadata (or the checkpoint's)")
    latent_channels: int = _f(4, "latent space: channels of the autoencoder's latent (4 for the SD VAE)")
    latent_downsample: int = _f(8, "latent space: image pixels per latent pixel (8 for the SD VAE)")
    num_workers: int = _f(0, "DataLoader worker processes per rank")

    def validate(self) -> None:
        _choice("data.source", self.source, ("shapes", "mds", "wds"))
        _choice("data.on_error", self.on_error, ("raise", "skip"))
        if self.source != "shapes" and not self.path:
            raise ConfigError(f"data.path must name the shards (a folder or s3://bucket/prefix) for data.source={self.source}")
        for key in ("path", "val_path"):
            value = getattr(self, key)
            if value.startswith("s3://") and len(value) <= len("s3://"):
                raise ConfigError(f"data.{key} {value!r} names no bucket")
        _choice("data.max_groups", self.max_groups, (1, 2))
        _choice("data.space", self.space, ("auto", "pixels", "latent"))
        if self.source == "shapes" and self.space == "latent":
            raise ConfigError("data.space=latent needs latent shards (data.source mds or wds, made by "
                              "`crossflow data features --vae ...`); the shapes generator yields pixels")
        for name in ("latent_channels", "latent_downsample"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.text_hidden_layer >= 0:
            raise ConfigError(f"data.text_hidden_layer counts from the last layer: -1, -2, ...; got {self.text_hidden_layer}")
        if self.text_dim < 0:
            raise ConfigError(f"data.text_dim must be >= 0, got {self.text_dim}")
        for name in ("resolution", "num_samples", "max_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"data.{name} must be positive, got {getattr(self, name)}")
        if self.resolution % 8:
            raise ConfigError(f"data.resolution must be a multiple of 8, got {self.resolution}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")


# The registered (source, target) pairs and their task names: trainer.tasks.TASKS is built from this table.
TASK_PAIRS = {("text_ve", "image"): "text_to_image", ("upsample", "image"): "super_resolution",
              ("image_ve", "depth"): "depth", ("image_ve", "caption"): "captioning"}


@dataclass
class TaskConfig:
    source: str = _f("text_ve", "the part that makes z0: text_ve (the Text VE over the caption), image_ve (a "
                                "variational image encoder) or upsample (the low-res image upsampled, no learned part)")
    target: str = _f("image", "the part z1 comes from and the output is decoded by: image (pixels or the VAE latent), "
                              "depth (the scene's depth map) or caption (a text latent with its decoder)")
    source_resolution: int = _f(0, "upsample: side of the low-res input (16 for 16->32, 64 for 64->256); must divide "
                                   "data.resolution")
    caption_latent: list[int] = _f([4, 8, 8], "caption target: shape (C, H, W) of the text latent the flow ends at")
    caption_kl_weight: float = _f(1e-4, "caption target: KL weight of the caption VE")
    target_pretrain_steps: int = _f(0, "caption target: the first K steps train only the caption autoencoder (caption "
                                       "VE + decoder), then it is frozen and the flow + image VE train (the paper's "
                                       "stages); 0 = joint (the flow's target is the caption VE's mean, detached)")

    def validate(self) -> None:
        _choice("task.source", self.source, ("text_ve", "image_ve", "upsample"))
        _choice("task.target", self.target, ("image", "depth", "caption"))
        if (self.source, self.target) not in TASK_PAIRS:
            pairs = ", ".join(f"{s}->{t} ({n})" for (s, t), n in TASK_PAIRS.items())
            raise ConfigError(f"task.source={self.source} with task.target={self.target} is not a registered task; "
                              f"registered: {pairs}")
        if self.source == "upsample" and self.source_resolution <= 0:
            raise ConfigError(f"task.source=upsample needs task.source_resolution > 0 (the low-res side), got "
                              f"{self.source_resolution}")
        if self.source != "upsample" and self.source_resolution:
            raise ConfigError(f"task.source_resolution={self.source_resolution} is set but task.source={self.source}: "
                              f"only upsample reads it")
        if len(self.caption_latent) != 3 or any(v <= 0 for v in self.caption_latent):
            raise ConfigError(f"task.caption_latent must be three positive ints (C, H, W), got {self.caption_latent}")
        if self.caption_kl_weight < 0:
            raise ConfigError(f"task.caption_kl_weight must be >= 0, got {self.caption_kl_weight}")
        if self.target_pretrain_steps < 0:
            raise ConfigError(f"task.target_pretrain_steps must be >= 0 (0 = joint), got {self.target_pretrain_steps}")
        if self.target_pretrain_steps and self.target != "caption":
            raise ConfigError(f"task.target_pretrain_steps={self.target_pretrain_steps} needs task.target=caption "
                              f"(got {self.target}): only the caption autoencoder is pre-trained")


@dataclass
class ObjectiveConfig:
    sigma_min: float = _f(1e-5, "flow-matching sigma_min: x_t = (1 - (1 - sigma_min) t) z0 + t z1")
    time_sampler: str = _f("logit_normal", "distribution of t: logit_normal (sigmoid of N(mean, std)) or uniform")
    time_mean: float = _f(0.0, "logit-normal mean of t")
    time_std: float = _f(1.0, "logit-normal std of t")
    kl_weight: float = _f(1e-4, "weight of KL(q(z0 | text) || N(0, I)) (paper 1e-4; reimplementation 1e-2)")
    contrastive_weight: float = _f(1.0, "weight of z0's alignment term (objective.contrastive); 0 = none (an ablation)")
    contrastive: str = _f("image_text", "z0's alignment term: image_text (InfoNCE with a learned image encoder), text_text "
                                        "(InfoNCE with a learned projection of the pooled text features) or "
                                        "reconstruction (MSE of a learned decoder back to them); logged as contrastive")
    ve_pretrain_steps: int = _f(0, "two-stage training: the first K of train.steps train only the Text VE (+ its "
                                   "alignment head) on contrastive + KL, then the flow (its warm-up and schedule "
                                   "restart at K), the VE frozen; 0 = joint from scratch (the paper's default)")
    ve_finetune: bool = _f(False, "two-stage training: after objective.ve_pretrain_steps keep training the Text VE "
                                  "jointly with the flow (the paper's fine-tuning variant) instead of freezing it")
    contrastive_init_temperature: float = _f(0.07, "initial temperature of the contrastive logits (learned)")
    uncond_prob: float = _f(0.1, "probability that a sample trains the unconditional indicator (for CFG)")

    def validate(self) -> None:
        _choice("objective.time_sampler", self.time_sampler, ("logit_normal", "uniform"))
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"objective.sigma_min must be in [0, 1), got {self.sigma_min}")
        if self.time_std <= 0:
            raise ConfigError(f"objective.time_std must be positive, got {self.time_std}")
        for name in ("kl_weight", "contrastive_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        _choice("objective.contrastive", self.contrastive, ("image_text", "text_text", "reconstruction"))
        if self.ve_pretrain_steps < 0:
            raise ConfigError(f"objective.ve_pretrain_steps must be >= 0 (0 = joint training), got {self.ve_pretrain_steps}")
        if self.ve_finetune and not self.ve_pretrain_steps:
            raise ConfigError("objective.ve_finetune=true needs objective.ve_pretrain_steps > 0 (it says what the "
                              "Text VE does after its pre-training stage)")
        if self.ve_pretrain_steps and self.contrastive_weight == 0:
            raise ConfigError(f"objective.ve_pretrain_steps={self.ve_pretrain_steps} trains the Text VE alone on "
                              f"contrastive + KL, but objective.contrastive_weight=0: set a positive weight")
        if not 0.0 < self.contrastive_init_temperature:
            raise ConfigError("objective.contrastive_init_temperature must be positive")
        if not 0.0 <= self.uncond_prob < 1.0:
            raise ConfigError(f"objective.uncond_prob must be in [0, 1), got {self.uncond_prob}")


@dataclass
class OptimConfig:
    lr: float = _f(1e-4, "peak learning rate of AdamW")
    betas: list[float] = _f([0.9, 0.9], "AdamW betas (the paper uses 0.9, 0.9)")
    eps: float = _f(1e-8, "AdamW epsilon")
    weight_decay: float = _f(0.03, "AdamW weight decay (not applied to norms, biases, embeddings, indicator vectors)")
    warmup_steps: int = _f(5000, "linear warm-up steps from 0 to lr")
    schedule: str = _f("constant", "after warm-up: constant or cosine (to min_lr_ratio * lr at train.steps)")
    min_lr_ratio: float = _f(0.1, "cosine schedule: final lr as a fraction of the peak")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value (0 disables)")

    def validate(self) -> None:
        _choice("optim.schedule", self.schedule, ("constant", "cosine"))
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim.warmup_steps, optim.grad_clip and optim.weight_decay must be >= 0")


@dataclass
class TrainConfig:
    steps: int = _f(1000, "optimizer steps to train")
    target_flops: float = _f(0.0, "training FLOP budget: when > 0 it sets train.steps = round(budget / (the model's "
                                  "FLOPs per sample x global_batch_size)), overriding train.steps; 0 = off")
    global_batch_size: int = _f(64, "samples per optimizer step, summed over ranks and accumulation")
    seed: int = _f(0, "seed of parameters, data order and noise")
    out_dir: str = _f("runs/default", "run directory: checkpoints, metrics.jsonl, samples")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu or cuda")
    precision: str = _f("fp32", "fp32 or bf16 (autocast; bf16 needs a GPU or a recent CPU)")
    ema_decay: float = _f(0.999, "EMA decay of the weights used for sampling (paper 0.9999); 0 disables")
    log_every: int = _f(10, "write metrics every N steps (our only host sync; DeepSpeed also syncs at each optimizer step: README)")
    ckpt_every: int = _f(500, "save a checkpoint every N steps (and at the end); 0 = only at the end")
    keep_last: int = _f(2, "checkpoints to keep")
    sample_every: int = _f(0, "write a sample grid of held-out prompts every N steps; 0 = only at the end")
    resume: str = _f("none", "none, auto (latest checkpoint in out_dir) or a checkpoint directory")
    threads: int = _f(0, "torch CPU threads per process; 0 keeps torch's default")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage: 1 (optimizer state), 2 (+ gradients), 3 (+ parameters) partitioned")
    offload_optimizer: bool = _f(False, "keep ZeRO optimizer state in CPU memory (DeepSpeed CPU Adam)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    activation_checkpointing: bool = _f(False, "recompute each transformer block's activations in backward (saves memory; "
                                                 "the blocks the model family names)")
    compile: bool = _f(False, "torch.compile each transformer block the model family names")
    init_from: str = _f("", "start a new run from this checkpoint's weights (directory or weights.safetensors): "
                            "position embeddings and latent-sized heads resized to this run's latent (e.g. 512 px "
                            "from a 256 px run); read by rank 0 only; optimizer, step and data position start fresh")
    memory_check: bool = _f(True, "crossflow train: refuse a GPU run whose `crossflow plan` memory estimate exceeds "
                                  "the GPU memory (CPU runs only print the estimate)")
    gpu_memory_gb: float = _f(0.0, "GPU memory per worker in GiB for the start-up memory check; 0 = the local CUDA "
                                   "device's, or no check when this machine has none")
    max_nonfinite_steps: int = _f(5, "stop with an error after this many optimizer steps in a row skipped for NaN/Inf")

    def validate(self) -> None:
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        _choice("train.precision", self.precision, ("fp32", "bf16"))
        _choice("train.zero_stage", self.zero_stage, (1, 2, 3))
        for name in ("steps", "global_batch_size", "log_every", "keep_last", "grad_accum", "max_nonfinite_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.target_flops < 0:
            raise ConfigError(f"train.target_flops must be >= 0 (0 = train.steps), got {self.target_flops}")
        if self.gpu_memory_gb < 0:
            raise ConfigError(f"train.gpu_memory_gb must be >= 0, got {self.gpu_memory_gb}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass
class SampleConfig:
    steps: int = _f(50, "ODE steps from t=0 to t=1")
    solver: str = _f("euler", "euler or heun")
    cfg_scale: float = _f(3.0, "classifier-free guidance scale s: v = v_u + s (v_c - v_u); 1 = no guidance")
    use_mean: bool = _f(False, "start from the VE mean instead of mu + sigma * eps (no effect with model.text_ve="
                               "deterministic: its z0 has no noise, every seed gives the same)")
    num_prompts: int = _f(16, "held-out prompts in the sample grid written by training")
    prompts_file: str = _f("", "a text file of prompts (one per line) for training's sample grids; default: held-out "
                               "shapes prompts, or the first captions seen for shard data")

    def validate(self) -> None:
        _choice("sample.solver", self.solver, ("euler", "heun"))
        if self.steps <= 0 or self.num_prompts <= 0:
            raise ConfigError("sample.steps and sample.num_prompts must be positive")
        if self.prompts_file and not Path(self.prompts_file).is_file():
            raise ConfigError(f"sample.prompts_file not found: {self.prompts_file}")


@dataclass
class LogConfig:
    wandb: str = _f("offline", "W&B mode: offline (files under <out_dir>/wandb, sync later), online, or disabled")
    wandb_project: str = _f("crossflow", "W&B project")
    wandb_group: str = _f("", "W&B group (sweeps put every run of a sweep in one group)")
    wandb_name: str = _f("", "W&B run name (default: the out_dir's name)")
    peak_tflops: float = _f(0.0, "peak TFLOP/s per device for MFU; 0 = 989 (H100 dense bf16) on CUDA, no MFU on CPU")
    progress: bool = _f(True, "rank 0 shows progress: a live bar on a terminal, else one line per logging interval")

    def validate(self) -> None:
        _choice("log.wandb", self.wandb, ("offline", "online", "disabled"))
        if self.peak_tflops < 0:
            raise ConfigError(f"log.peak_tflops must be >= 0, got {self.peak_tflops}")


@dataclass
class EvalConfig:
    every: int = _f(0, "run ShapesEval on the EMA weights every N steps; 0 = only at the end")
    shapes: bool = _f(True, "score the ShapesEval suite (shapes data only) during and after training")
    images_per_prompt: int = _f(2, "ShapesEval images per prompt during training")
    cfg_scales: list[float] = _f([], "guidance scales the end-of-training ShapesEval also scores, each logged as "
                                     "shapes_eval/<task>@cfg<s> (1 = no guidance); empty = only sample.cfg_scale")
    val_every: int = _f(0, "validation loss (val/loss: flow matching of the live weights, not the EMA, on a fixed "
                           "set, t grid and noise) every N steps and at the end; 0 = none")
    val_samples: int = _f(256, "validation set size: the first N samples of data.val_path, or N generated shapes "
                               "scenes disjoint from the training scenes")
    val_t_points: int = _f(4, "K times per validation sample, t_i = (i + 0.5) / K; val/loss averages them")
    val_seed: int = _f(0, "seed of the validation noise (z0's eps) and of the shapes validation scenes")

    def validate(self) -> None:
        if self.every < 0 or self.images_per_prompt <= 0:
            raise ConfigError("eval.every must be >= 0 and eval.images_per_prompt positive")
        if self.val_every < 0:
            raise ConfigError(f"eval.val_every must be >= 0 (0 = no validation), got {self.val_every}")
        for name in ("val_samples", "val_t_points"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"eval.{name} must be positive, got {getattr(self, name)}")
        if self.val_seed < 0:
            raise ConfigError(f"eval.val_seed must be >= 0, got {self.val_seed}")
        if any(s < 0 for s in self.cfg_scales):
            raise ConfigError(f"eval.cfg_scales must be >= 0 (1 = no guidance), got {self.cfg_scales}")
        if len({cfg_scale_name(s) for s in self.cfg_scales}) != len(self.cfg_scales):
            raise ConfigError(f"eval.cfg_scales has repeated values: {self.cfg_scales}")


def cfg_scale_name(scale: float) -> str:
    """A guidance scale in metric names: 3.0 -> ``cfg3``, 1.5 -> ``cfg1.5`` (``shapes_eval/overall@cfg3``)."""
    return f"cfg{scale:g}"


def at_cfg_scale(name: str, scale: float) -> str:
    """A metric's name at a guidance scale: ``overall``, 3.0 -> ``overall@cfg3``."""
    return f"{name}@{cfg_scale_name(scale)}"


def check_validation_data(data: DataConfig, ev: EvalConfig) -> None:
    """The validation set's source agrees with the training data's: shard data validates on
    held-out shards (data.val_path), the shapes generator on scenes it generates."""
    if data.source == "shapes" and data.val_path:
        raise ConfigError(f"data.val_path={data.val_path!r} is set but data.source=shapes: the shapes validation "
                          f"set is generated (eval.val_seed); leave data.val_path empty")
    if data.source != "shapes" and ev.val_every and not data.val_path:
        raise ConfigError(f"eval.val_every={ev.val_every} with data.source={data.source} needs data.val_path: "
                          f"held-out shards (same format as data.path) never trained on")
    if data.val_path and data.val_path.rstrip("/") == data.path.rstrip("/"):
        raise ConfigError(f"data.val_path is data.path ({data.path!r}): validation needs held-out shards")


def check_variants(model: ModelConfig, objective: ObjectiveConfig, train: TrainConfig) -> None:
    """The ablation variants fit the model family and the run's length."""
    if model.family != "crossflow":
        asked = {k: v for k, v in (("model.text_ve", model.text_ve), ("objective.contrastive", objective.contrastive),
                                   ("objective.ve_pretrain_steps", objective.ve_pretrain_steps))
                 if v not in ("variational", "image_text", 0)}
        if asked:
            raise ConfigError(f"{asked} need model.family=crossflow: {model.family} has no Text VE (its z0 is noise, "
                              f"not from the text)")
    if not train.target_flops:  # else train.steps comes from the budget: plan.with_target_flops checks it
        check_two_stage_length(objective, train.steps)


def check_two_stage_length(objective: ObjectiveConfig, steps: int) -> None:
    """objective.ve_pretrain_steps counts inside train.steps: the flow needs steps after it."""
    if objective.ve_pretrain_steps and objective.ve_pretrain_steps >= steps:
        raise ConfigError(f"objective.ve_pretrain_steps={objective.ve_pretrain_steps} must be less than "
                          f"train.steps={steps} (the pre-training stage counts in train.steps)")


def check_task(cfg: "Config") -> None:
    """The task (task.source, task.target) fits the data, the model and the other sections."""
    t, d = cfg.task, cfg.data
    if (t.source, t.target) == ("text_ve", "image"):
        return
    name = TASK_PAIRS[(t.source, t.target)]
    if d.source != "shapes" and t.source != "upsample":
        raise ConfigError(f"task {name} (task.source={t.source}, task.target={t.target}) trains on the shapes "
                          f"generator (its depth maps, captions' token ids and images); got data.source={d.source}")
    if d.space == "latent" and t.source != "upsample":
        raise ConfigError(f"task {name} works in pixel space; got data.space=latent (only super_resolution "
                          f"runs through the VAE)")
    if cfg.model.family != "crossflow":
        raise ConfigError(f"task {name} needs model.family=crossflow, got {cfg.model.family}")
    if cfg.objective.ve_pretrain_steps:
        raise ConfigError(f"objective.ve_pretrain_steps={cfg.objective.ve_pretrain_steps} pre-trains the Text VE, "
                          f"but task.source={t.source}: it applies to task.source=text_ve only")
    if t.source == "image_ve" and cfg.objective.contrastive_weight > 0 and cfg.objective.contrastive != "image_text":
        raise ConfigError(f"objective.contrastive={cfg.objective.contrastive} aligns z0 with text features, but "
                          f"task.source=image_ve has none: use image_text (or objective.contrastive_weight=0)")
    if t.source == "upsample" and d.resolution % t.source_resolution:
        raise ConfigError(f"task.source_resolution={t.source_resolution} must divide data.resolution="
                          f"{d.resolution}")
    if t.target == "caption":
        patch = cfg.model.patch_size or _preset_patch_size(cfg.model.preset)
        _, h, w = t.caption_latent
        if h % patch or w % patch:
            raise ConfigError(f"task.caption_latent={t.caption_latent}: H and W must be divisible by the patch size "
                              f"{patch} (model.patch_size or preset {cfg.model.preset})")
    if t.target_pretrain_steps and not cfg.train.target_flops and t.target_pretrain_steps >= cfg.train.steps:
        raise ConfigError(f"task.target_pretrain_steps={t.target_pretrain_steps} must be less than train.steps="
                          f"{cfg.train.steps} (the pre-training stage counts in train.steps)")


def _preset_patch_size(preset: str) -> int:
    from trainer.models.crossflow.presets import PRESETS
    return PRESETS[preset].patch_size


@dataclass
class ClusterConfig:
    use_ray: bool = _f(True, "crossflow train runs through Ray Train (TorchTrainer); false = this process, or torchrun "
                             "with --nproc (debugging)")
    preset: str = _f("", "cluster values loaded first from configs/cluster/<preset>.yaml (or a YAML path); keys set "
                         "in the config file or overrides win")
    address: str = _f("", "Ray cluster to join (auto, host:port, ray://...); empty = RAY_ADDRESS, else an embedded "
                          "local cluster")
    num_workers: int = _f(2, "training workers (one DeepSpeed rank each: one per GPU, or CPU workers on gloo)")
    cpus_per_worker: float = _f(1.0, "CPUs reserved per worker (also its OMP_NUM_THREADS, at least 1)")
    gpus_per_worker: float = _f(0.0, "GPUs per worker; > 0 trains on CUDA with nccl")
    memory_per_worker_gb: float = _f(0.0, "heap memory reserved per worker in GiB; 0 reserves none")
    placement_strategy: str = _f("PACK", "placement group strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD")
    max_failures: int = _f(1, "worker-group restarts from the latest checkpoint after a worker dies; -1 = no limit")
    storage_path: str = _f("", "where Ray Train persists reported checkpoints: a folder or s3://bucket/prefix "
                               "(default: <train.out_dir>/ray)")
    name: str = _f("", "Ray Train run name under storage_path (default: the out_dir's name); a re-run with "
                       "train.resume=auto continues it")
    stop_timeout_s: float = _f(120.0, "on Ctrl-C/SIGTERM: seconds the workers get to write a final checkpoint "
                                      "before they are killed")
    runtime_env: str = _f("working_dir", "what crossflow submit ships (cluster/runtime_env.py): working_dir (the "
                                         "repo; nodes have the dependencies), pip (the repo + pip requirements), "
                                         "image (cluster.image), none (a shared file system)")
    image: str = _f("", "container image for cluster.runtime_env=image (Ray's image_uri): the repo at "
                        "cluster.image_workdir, its dependencies installed")
    image_workdir: str = _f("/workspace/crossflow", "where cluster.image holds the repository; the job runs from there")
    requirements: str = _f("", "cluster.runtime_env=pip: a requirements file inside the working dir; empty = "
                               "setup.cfg's install_requires")
    working_dir_excludes: list[str] = _f([], "more gitignore patterns left out of the shipped working dir (besides "
                                             ".git, .venv, runs/, wandb/, caches, shard folders)")
    max_file_mb: float = _f(10.0, "files in the working dir larger than this (MiB) are not shipped (data and weights "
                                  "go on s3:// or shared storage)")
    env_vars: list[str] = _f([], "names of more variables copied from the submitting shell into the job (credentials "
                                 "such as AWS_SECRET_ACCESS_KEY go only when named here)")

    def validate(self) -> None:
        _choice("cluster.placement_strategy", self.placement_strategy,
                ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
        if self.num_workers <= 0:
            raise ConfigError(f"cluster.num_workers must be positive, got {self.num_workers}")
        for name in ("cpus_per_worker", "gpus_per_worker", "memory_per_worker_gb", "stop_timeout_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"cluster.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_failures < -1:
            raise ConfigError(f"cluster.max_failures must be >= -1, got {self.max_failures}")
        _choice("cluster.runtime_env", self.runtime_env, ("working_dir", "pip", "image", "none"))
        if self.runtime_env == "image" and not self.image:
            raise ConfigError("cluster.runtime_env=image needs cluster.image (a container image name)")
        if self.image and self.runtime_env != "image":
            raise ConfigError(f"cluster.image={self.image!r} is set but cluster.runtime_env={self.runtime_env!r}: "
                              f"set cluster.runtime_env=image, or leave cluster.image empty")
        if self.requirements and self.runtime_env != "pip":
            raise ConfigError(f"cluster.requirements={self.requirements!r} is set but "
                              f"cluster.runtime_env={self.runtime_env!r}: requirements are installed only with pip")
        if self.max_file_mb <= 0:
            raise ConfigError(f"cluster.max_file_mb must be positive, got {self.max_file_mb}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> "Config":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        check_validation_data(self.data, self.eval)
        check_variants(self.model, self.objective, self.train)
        check_task(self)
        if self.eval.cfg_scales and not (self.eval.shapes and self.data.source == "shapes"):
            raise ConfigError(f"eval.cfg_scales={self.eval.cfg_scales} needs the ShapesEval that scores them: "
                              f"eval.shapes=true and data.source=shapes (got eval.shapes={self.eval.shapes}, "
                              f"data.source={self.data.source})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats. Names ``key`` on error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r} ({type(value).__name__})")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r} ({type(value).__name__})")


def _apply(obj: Any, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise ConfigError(f"unknown config key {key!r}; valid keys under {prefix or 'the top level'}: {sorted(names)}")
        current = getattr(obj, k)
        if dataclasses.is_dataclass(current):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping of {sorted(f.name for f in dataclasses.fields(current))}, got {v!r}")
            _apply(current, v, f"{key}.")
        else:
            setattr(obj, k, _coerce(key, v, hints[k]))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` or ``"--optim.lr=3e-4"`` -> (["optim", "lr"], 3e-4); values are YAML scalars."""
    body = item[2:] if item.startswith("--") else item
    if "=" not in body:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def read_yaml_mapping(path: str | Path, what: str, keys: str) -> dict:
    """A YAML file whose top level is a mapping (config and sweep files); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {keys}")
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- overrides, then validation. Raises ConfigError naming the key."""
    cfg = Config()
    values: dict = {}
    if path is not None:
        values = read_yaml_mapping(path, "config file", "sections")
    parsed = [parse_override(item) for item in overrides]
    preset = next((v for k, v in reversed(parsed) if k == ["cluster", "preset"]), None)
    if preset is None and isinstance(values.get("cluster"), dict):
        preset = values["cluster"].get("preset")
    if preset:  # lowest precedence: the file's and the overrides' cluster keys win
        _apply(cfg, {"cluster": cluster_preset_values(str(preset))}, "")
    _apply(cfg, values, "")
    for keys, value in parsed:
        _apply(cfg, _nest(keys, value), "")
    return cfg.validate()


CLUSTER_PRESETS = Path(__file__).resolve().parents[1] / "configs" / "cluster"


def cluster_preset_values(preset: str) -> dict:
    """The cluster keys of ``configs/cluster/<preset>.yaml`` (or of a YAML file path): a flat mapping."""
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else CLUSTER_PRESETS / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CLUSTER_PRESETS.glob("*.yaml"))
        raise ConfigError(f"cluster.preset {preset!r}: no file {path} (presets: {known})")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict) or "preset" in values:
        raise ConfigError(f"{path}: must be a flat mapping of cluster keys (no 'preset')")
    return values


def config_from_dict(values: dict) -> Config:
    """Rebuild a Config saved with ``Config.to_dict`` (checkpoints store it)."""
    cfg = Config()
    _apply(cfg, values, "")
    return cfg.validate()


def describe(cfg: Config) -> str:
    """Every key with its value and help text, for ``crossflow config``."""
    lines = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            lines.append(f"{section.name}.{f.name} = {getattr(sub, f.name)!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)


def per_rank_batch_size(global_batch_size: int, world_size: int, grad_accum: int = 1) -> int:
    """The one place that derives the per-rank micro-batch: global = micro * world * accumulation."""
    denom = world_size * grad_accum
    if global_batch_size % denom:
        raise ConfigError(f"train.global_batch_size={global_batch_size} is not divisible by "
                          f"world size {world_size} x gradient accumulation {grad_accum}")
    return global_batch_size // denom
