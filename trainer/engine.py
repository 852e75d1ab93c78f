"""The training engine: DeepSpeed ZeRO around the single-device model, plus EMA.

Model code stays parallelism-free; everything distributed is applied here, from outside:
process group (gloo on CPU, nccl on CUDA), ``deepspeed.initialize`` with ZeRO stage 1-3 and
optional CPU offload of optimizer state, bf16 on GPU, gradient accumulation and clipping,
per-block activation checkpointing and ``torch.compile`` of the blocks the model's family names
(``trainer.models.families.wrapped_blocks``: the engine knows no model internals), AdamW without weight
decay on norms/biases/embeddings/indicator vectors, warm-up then constant or cosine LR.

Two-stage training (``objective.ve_pretrain_steps`` K > 0; ``task.target_pretrain_steps`` for the
caption target, whose first part is the caption autoencoder: ``first_stage_modules``) splits the
groups into the text side (``trainer.models.families.text_side_modules``) and the flow, each with
its own LR multiplier: the flow's is 0 before step K, then its warm-up and schedule run from K; the
text side's follows the schedule from step 0 and is 0 from K unless ``objective.ve_finetune``. AdamW with learning rate 0
leaves a parameter exactly as it is (its weight decay and its moments' update both scale with the
learning rate), so the frozen part does not move at all, under any ZeRO stage (DeepSpeed's ZeRO
optimizers step the wrapped optimizer's own groups, LRs included). The objective gives the frozen
part gradients of exactly 0 (``trainer.objectives.flow_losses``), so it adds nothing to the
clipped global norm.

Non-finite steps: DeepSpeed's ZeRO optimizers compute the global gradient norm at each
optimizer step and skip the update (no parameter, optimizer or LR-schedule change) when it is
NaN or Inf; ``step()`` reports whether the update was applied, and the loop counts skips.
"""
from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from trainer.console import quiet_deepspeed_on_cpu, without_build_notice
from trainer.models.families import text_side_modules, wrapped_blocks
from trainer.objectives import FROZEN_STAGES, PRETRAIN_STAGES, TwoStage, as_two_stage, training_stage

NO_DECAY_NAMES = ("indicator", "pos_embed", "logit_scale")

# The EMA's warm-up (TensorFlow's ExponentialMovingAverage with num_updates): after n updates the
# decay is min(decay, (1 + n) / (EMA_WARMUP + n)), 0.18 after one update and 0.9 after 80, so the
# average forgets the random initial weights within the first hundred steps instead of the
# 1 / (1 - decay) steps a fixed decay takes.
EMA_WARMUP = 10


# ----------------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device_name: str = "auto") -> DistInfo:
    """Join (or create, for a lone process) the process group: torchrun, Ray Train and a bare
    ``python`` all end here. gloo on CPU, nccl on CUDA. A lone process gets a world of one on a
    free loopback port and leaves the environment alone (a subprocess it starts must not
    inherit a RANK or a MASTER_PORT)."""
    env = os.environ
    if dist.is_initialized():  # a launcher (Ray Train) made the group, perhaps without env vars
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(env.get("LOCAL_RANK", 0))
    elif "RANK" in env:  # torchrun / Ray: the rendezvous is in the environment
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    else:
        rank, world, local = 0, 1, 0
    device = resolve_device(device_name, local)
    if device.type == "cpu":
        quiet_deepspeed_on_cpu()
    import deepspeed
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    with without_build_notice():
        if not dist.is_initialized():
            if "RANK" in env:
                deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
            else:
                dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
                env.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it; harmless to a child (no RANK)
        if not deepspeed.comm.is_initialized():  # DeepSpeed's comm layer wraps the existing group
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    return DistInfo(rank, world, local, device)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


# ----------------------------------------------------------------------------- optimizer pieces
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, embeddings and the indicator vectors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def first_stage_modules(model: nn.Module, plan: TwoStage) -> list[nn.Module]:
    """What a two-stage run's first stage trains (the ``text`` part): the text side
    (objective.ve_pretrain_steps) or the caption autoencoder (task.target_pretrain_steps)."""
    if plan.part == "caption":
        from trainer.tasks import caption_autoencoder
        return [caption_autoencoder(model)]
    return text_side_modules(model)


def two_stage_param_groups(model: nn.Module, weight_decay: float, plan: TwoStage = TwoStage()) -> list[dict]:
    """``param_groups`` of the flow, then of the text side (``first_stage_modules``), each group
    tagged ``part``: flow or text (empty groups left out)."""
    text_ids = {id(p) for m in first_stage_modules(model, plan) for p in m.parameters()}
    groups = []
    for part, keep in (("flow", lambda p: id(p) not in text_ids), ("text", lambda p: id(p) in text_ids)):
        for group in param_groups(model, weight_decay):
            params = [p for p in group["params"] if keep(p)]
            if params:
                groups.append({**group, "params": params, "part": part})
    return groups


def part_frozen(plan, part: str, step: int) -> bool:
    """Whether the ``part`` (flow or text) of a two-stage run (``plan``: a TwoStage or an
    ObjectiveConfig) stays still at optimizer step ``step``."""
    stage = training_stage(plan, step)
    return (part == "flow" and stage in PRETRAIN_STAGES) or (part == "text" and stage in FROZEN_STAGES)


def two_stage_lr_lambdas(optim_cfg, plan, total_steps: int, groups: list[dict]) -> list:
    """One LR multiplier per group: 0 where the group's part is frozen; the flow's schedule starts at
    the pre-training steps K, the text side's at 0."""
    plan = as_two_stage(plan)
    K = plan.steps
    schedules = {"flow": lr_lambda(optim_cfg, total_steps, start=K), "text": lr_lambda(optim_cfg, total_steps)}

    def gated(part: str):
        return lambda step: 0.0 if part_frozen(plan, part, step) else schedules[part](step)
    return [gated(g["part"]) for g in groups]


def lr_lambda(optim_cfg, total_steps: int, start: int = 0):
    """Multiplier of the peak LR at optimizer step s: linear warm-up, then constant or cosine; a
    schedule that ``start``s later counts its warm-up and cosine from there (0 before)."""
    warmup = optim_cfg.warmup_steps
    total_steps -= start

    def f(step: int) -> float:
        step -= start
        if step < 0:
            return 0.0
        if warmup and step < warmup:
            return (step + 1) / warmup
        if optim_cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        lo = optim_cfg.min_lr_ratio
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def deepspeed_config(train_cfg, optim_cfg, micro_batch: int, world_size: int, device_type: str = "cpu") -> dict:
    """The DeepSpeed JSON config, derived from our typed config (one source of truth). The optimizer
    is torch's AdamW (DeepSpeed passes the params through): ``fused=True`` on CUDA (one kernel for
    all parameters), the default for-each implementation on CPU; DeepSpeed's CPU Adam with offload."""
    torch_adam = not train_cfg.offload_optimizer
    zero = {"stage": train_cfg.zero_stage}
    if train_cfg.zero_stage == 3:
        # No "persistent" unpartitioned small parameters: every parameter's authoritative copy is its
        # partition, which the EMA averages and swaps (costs a few more small all-gathers).
        zero["stage3_param_persistence_threshold"] = 0
    if train_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": micro_batch * world_size * train_cfg.grad_accum,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train_cfg.grad_accum,
        "gradient_clipping": optim_cfg.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim_cfg.lr, "betas": list(optim_cfg.betas), "eps": optim_cfg.eps,
            "weight_decay": optim_cfg.weight_decay,
            # torch's AdamW: no JIT-compiled fused Adam needed (CPU machines, fast start)
            "torch_adam": torch_adam,
            **({"fused": True} if torch_adam and device_type == "cuda" else {})}},
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": train_cfg.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# ----------------------------------------------------------------------------- model transforms
def enable_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in backward (non-reentrant torch.utils.checkpoint);
    parameter names are unchanged, so checkpoints and exports do not notice."""
    from torch.utils.checkpoint import checkpoint
    for block in blocks:
        inner = block.forward
        block.forward = lambda *args, _f=inner: checkpoint(_f, *args, use_reentrant=False)


def compile_blocks(blocks: list[nn.Module]) -> None:
    for block in blocks:
        block.compile()


# ----------------------------------------------------------------------------- EMA
def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


class EMA:
    """Exponential moving average of the weights, kept in fp32, warm-up min(decay, (1+n)/(EMA_WARMUP+n)).

    Under ZeRO-3 each rank averages only its own partition of every parameter (``ds_tensor``):
    no gather per step, memory split like the weights. ``swapped_in`` temporarily writes the EMA
    into the (partitioned) parameters, so sampling and export see the EMA through ZeRO's own
    gathering."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {n: self._local(p).detach().float().clone() for n, p in model.named_parameters()}
        self._shadow_list = list(self.shadow.values())  # the same tensors, in named_parameters order

    @staticmethod
    def _local(p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if _is_partitioned(p) else p.data

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (EMA_WARMUP + self.updates))
        # One for-each lerp over all tensors (the same bits as a lerp_ per tensor). The shadow list is
        # built once; the weights' list is looked up each update: ZeRO 1/2 rebind every ``p.data``
        # to a view of their flat buffer at each optimizer step (``_update_model_bit16_weights``),
        # and a load replaces that buffer, so views kept from __init__ could go stale.
        # ``.float()`` is free for fp32 weights; bf16 weights get one fp32 copy per tensor.
        weights = [self._local(p).float() for p in model.parameters()]
        torch._foreach_lerp_(self._shadow_list, weights, 1.0 - d)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module):
        """Within the block the model's parameters hold the EMA; restored afterwards."""
        saved = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                local = self._local(p)
                saved[n] = local.clone()
                local.copy_(self.shadow[n].to(local.dtype))
        try:
            yield model
        finally:
            with torch.no_grad():
                for n, p in model.named_parameters():
                    self._local(p).copy_(saved[n])

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = state["decay"], state["updates"]
        for n, v in state["shadow"].items():
            if self.shadow[n].shape != v.shape:
                raise ValueError(f"EMA tensor {n}: checkpoint shape {tuple(v.shape)} != {tuple(self.shadow[n].shape)} "
                                 "(resuming with a different ZeRO stage or world size is not supported for the EMA)")
            self.shadow[n].copy_(v)


@contextlib.contextmanager
def gathered(tensor: torch.Tensor):
    """The full parameter inside the block: ZeRO-3 gathers it on every rank (collective), read-only
    (``modifier_rank=None``: nothing is broadcast back); any other tensor as it is."""
    if not _is_partitioned(tensor):
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
        yield


def _fp32_cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().cpu().clone()


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """A float32 CPU copy of every parameter and buffer, or None where ``keep`` is False.

    Under ZeRO-3 collective: every rank joins each parameter's gather, one parameter at a time (a
    rank holds one full parameter beyond its partition, not the whole model), and only a keeping
    rank copies it to the host; DeepSpeed has no gather to one rank, so the others receive it too."""
    copy = {} if keep else None
    for name, t in model.state_dict(keep_vars=True).items():
        with gathered(t):
            if keep:
                copy[name] = _fp32_cpu_copy(t)
    return copy


def shadow_state_dict(model: nn.Module, shadow: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict (names, order, buffers) with the EMA's fp32 ``shadow`` in place of
    each parameter, as float32 CPU copies; for unpartitioned models, whose shadow is whole."""
    shadow_of = {id(p): shadow[n] for n, p in model.named_parameters()}  # tied weights: one shadow
    return {k: _fp32_cpu_copy(shadow_of.get(id(t), t)) for k, t in model.state_dict(keep_vars=True).items()}


# ----------------------------------------------------------------------------- engine
class Engine:
    """DeepSpeed engine + EMA. ``forward`` via ``module``; ``backward(loss)``; ``step() -> applied``."""

    def __init__(self, model: nn.Module, train_cfg, optim_cfg, micro_batch: int, dist_info: DistInfo,
                 objective_cfg=None):
        """``objective_cfg``: the run's two stages (``trainer.objectives.TwoStage``, or an
        ObjectiveConfig: its ve_pretrain_steps), for two-stage training (K > 0)."""
        import deepspeed
        self.dist = dist_info
        blocks = wrapped_blocks(model)
        if train_cfg.activation_checkpointing:
            enable_activation_checkpointing(blocks)
        if train_cfg.compile:
            compile_blocks(blocks)
        model.to(dist_info.device)
        ds_config = deepspeed_config(train_cfg, optim_cfg, micro_batch, dist_info.world_size,
                                     dist_info.device.type)
        plan = as_two_stage(objective_cfg) if objective_cfg is not None else TwoStage()
        self.two_stage = plan if plan.steps else None
        if self.two_stage is None:
            groups = param_groups(model, optim_cfg.weight_decay)
            lambdas = lr_lambda(optim_cfg, train_cfg.steps)
        else:
            groups = two_stage_param_groups(model, optim_cfg.weight_decay, plan)
            lambdas = two_stage_lr_lambdas(optim_cfg, plan, train_cfg.steps, groups)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambdas),
            dist_init_required=False)
        self.module = self.ds.module
        self.ema = EMA(self.module, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
        self.precision = train_cfg.precision
        self.zero_stage = train_cfg.zero_stage

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def autocast(self):
        """bf16 autocast for the ops DeepSpeed's bf16 weights don't already cover (fp32 on CPU)."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> bool:
        """Advance one micro-step; at an accumulation boundary, clip + AdamW + schedule + EMA.
        Returns False when the optimizer step was skipped for a non-finite gradient."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        if boundary and self.two_stage is not None:
            self._zero_frozen_lrs()
        self.ds.step()
        if not boundary:
            return True
        applied = self.ds.was_step_applied()
        if applied and self.ema is not None:
            self.ema.update(self.module)
        return applied

    def _zero_frozen_lrs(self) -> None:
        """LR 0 for the part frozen at this optimizer step, counted as the loop counts it (DeepSpeed's
        ``global_steps``, restored on resume). The schedule already says so, but it counts only
        applied steps: after a skipped non-finite step it would lag one step behind the stage."""
        for group in self.optimizer.param_groups:
            if part_frozen(self.two_stage, group["part"], self.ds.global_steps):
                group["lr"] = 0.0

    def grad_norm(self) -> float | None:
        return self.ds.get_global_grad_norm()

    @property
    def lr(self) -> float:
        """The LR of the groups that train (two-stage: of the part not frozen)."""
        return max(g["lr"] for g in self.optimizer.param_groups)

    @contextlib.contextmanager
    def ema_weights(self):
        """The model with EMA weights (or the live ones without an EMA), for sampling."""
        if self.ema is None:
            yield self.module
        else:
            with self.ema.swapped_in(self.module) as m:
                yield m

    def ema_full_state_dict(self, keep: bool = True) -> dict[str, torch.Tensor] | None:
        """Consolidated float32 EMA weights (the live ones without an EMA) on a rank that ``keep``s
        them, None on the others. Under ZeRO-3 collective: every rank swaps its EMA partition in
        and joins the gathers. Otherwise only a keeping rank does any work, reading the EMA's
        fp32 shadow directly (no swap through the bf16/fp16 weights)."""
        if self.zero_stage == 3:
            with self.ema_weights() as m:
                return full_state_dict(m, keep)
        if not keep:
            return None
        if self.ema is None:
            return full_state_dict(self.module)
        return shadow_state_dict(self.module, self.ema.shadow)

    def ema_state_for_rank(self) -> dict | None:
        """What this rank must save of the EMA: its partition under ZeRO-3, rank 0's copy otherwise."""
        if self.ema is None or (self.zero_stage < 3 and self.dist.rank != 0):
            return None
        return self.ema.state_dict()

    def save(self, directory: str, tag: str) -> None:
        self.ds.save_checkpoint(directory, tag=tag, save_latest=False)

    def load(self, directory: str, tag: str) -> None:
        path, _ = self.ds.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint {tag} in {directory}")
