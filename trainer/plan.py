"""``crossflow plan``: what a config costs per GPU before anything runs.

The model is built on the meta device through the same two calls training makes
(``trainer.tasks.task_model_args`` + ``model_from_args``, for the input ``declared_model_input(cfg)``
says, with the task's flow shape, source and target parts),
so parameter counts are exact and nothing is allocated. From them, per GPU (bytes; P = trainable
parameters, N = world size = ``cluster.num_workers`` after the cluster preset, w = 2 for bf16
weights and 4 for fp32):

    weights      w P                      (ZeRO-3: w P / N)
    gradients    ZeRO-1: w P (full low-precision grads) + 4 P / N (fp32 partition)
                 ZeRO-2/3: 4 P / N (fp32 partition) + w R (DeepSpeed's reduce bucket, R = 5e8 elements)
    optimizer    (4 + 8) P / N: fp32 master copy + Adam's two moments (DeepSpeed keeps the fp32 copy
                 even for fp32 weights); with CPU offload the optimizer state and fp32 gradients
                 live in host memory instead
    EMA          4 P (ZeRO-3: 4 P / N): the fp32 shadow the engine keeps on the device
    activations  micro-batch x a, with a per sample, summed over the family's block stacks
                 (``families.BlockStack``: depth L, tokens T, width D, MLP ratio r, cross-attention
                 keys n), b = 2 bytes under bf16 and 4 under fp32:
                     one block         A = b T D (13 + 2 r)  [+ b (5 T D + 2 n D) with cross-attention]
                                       (LN in/out and modulated input 3, qkv 3, attention out and its
                                       copy 2, projection out 1, the MLP's LN 3 and fc2 out 1, fc1 and
                                       GELU outputs 2r; fused attention stores no T x T matrix)
                     without AC        a = sum L A + 6 b T D (embeddings, final layer)
                     with AC           a = sum L b T D + max A + 6 b T D (each block's input is kept,
                                       one block is recomputed at a time in backward)
    step temps   4 P / N: torch AdamW's foreach temporaries during the step (no activations then)
    overhead     a fixed 1.0 GiB (CUDA context, cuBLAS/NCCL workspaces; not in torch's allocated
                 peak) + 5% allocator slack on the tensors

``allocated`` = weights + gradients + optimizer + EMA + max(activations, step temps): what
torch.cuda.max_memory_allocated (metrics.jsonl's peak_memory_gb on GPU) measures; ``total`` adds
the slack and the fixed overhead and is what must fit the GPU.

Communication per GPU per optimizer step (ring collectives, each GPU sends (N-1)/N of the tensor
for a reduce-scatter or an all-gather, 2 (N-1)/N for an all-reduce), in the weights' dtype, k =
grad_accum: ZeRO-1 reduce-scatter + all-gather once per step; ZeRO-2 reduce-scatter every
micro-batch + one all-gather; ZeRO-3 two all-gathers (forward, backward) and a reduce-scatter every
micro-batch. Time = bytes / bandwidth; compute time = FLOPs (x 4/3 with activation checkpointing,
the recomputed forward) x global batch / (N x peak x MFU). The larger one bounds the step.
"""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field

import torch

from trainer.config import Config, ConfigError, check_two_stage_length, per_rank_batch_size
from trainer.model_input import declared_model_input
from trainer.models.families import BlockStack, family_of, model_from_args
from trainer.tasks import task_model_args, with_flow_shape

GIB = 2**30
REDUCE_BUCKET_ELEMENTS = 5e8  # DeepSpeed's default reduce_bucket_size (our config leaves it)
FIXED_OVERHEAD_GIB = 1.0  # CUDA context, cuBLAS and NCCL workspaces (outside torch's allocator)
ALLOCATOR_SLACK = 0.05  # fragmentation of the caching allocator, as a fraction of the tensors
ACTIVATION_ELEMENTS_PER_TOKEN_OUTSIDE_BLOCKS = 6  # patch embedding, position, final layer (x T D)
# Measured on an H100 (bench/RESULTS.md, 0.95B, bf16, ZeRO-2): with per-block activation
# checkpointing a sample costs 84.6 MiB where the formula gives 39.5 (without checkpointing the
# formula is within 1%: 388 vs 386 MiB; on CPU in fp32 the checkpointed term matched within 5%).
# The cause is not located yet; until it is, bf16 checkpointed estimates are scaled by the measured
# ratio so that the start-up check and the largest micro-batch err on the safe side.
AC_BF16_MEASURED_RATIO = 84.6 / 39.5


@dataclass(frozen=True)
class Hardware:
    gpu_memory_gb: float = 80.0  # GiB per GPU
    bandwidth_gbps: float = 400.0  # Gbit/s per GPU on the slowest link of the ring (one NDR NIC per GPU)
    mfu: float = 0.45
    peak_tflops: float = 989.0  # H100 dense bf16


@dataclass
class Plan:
    config: str
    family: str
    preset: str
    latent_shape: tuple[int, int, int]
    text_dim: int
    max_tokens: int
    params: dict[str, int]
    trainable_params: int
    flow_params: int  # the flow network's (the size a scaling study counts: ``flow_params()``)
    flops_per_sample: float  # the model's training FLOPs per sample (what metrics.jsonl's MFU uses)
    tokens_per_sample: int  # image tokens through the flow transformer
    world_size: int
    zero_stage: int
    precision: str
    offload_optimizer: bool
    activation_checkpointing: bool
    global_batch_size: int
    micro_batch: int  # the one the memory rows are for
    grad_accum: int
    memory_gib: dict[str, float]  # per GPU, at micro_batch
    activation_gib_per_sample: dict[str, float]  # with and without activation checkpointing
    host_gib: float  # optimizer state held in host memory (offload)
    allocated_gib: float
    total_gib: float
    hardware: dict = field(default_factory=dict)
    fits: bool = True
    max_micro_batch: int = 0  # the largest that fits the GPU memory
    best_micro_batch: int = 0  # the largest that fits and divides global / N
    best_grad_accum: int = 0
    comm_gb_per_step: float = 0.0
    comm_s_per_step: float = 0.0
    compute_s_per_step: float = 0.0
    bound: str = ""
    notes: list[str] = field(default_factory=list)
    target_flops: float = 0.0  # train.target_flops (0 = the steps are train.steps)
    steps: int = 0  # optimizer steps: train.steps, or derived from target_flops
    training_flops: float = 0.0  # steps x global batch x flops_per_sample
    task: str = "text_to_image"  # trainer.tasks: the flow's ends (latent_shape is the flow's shape)


# ----------------------------------------------------------------------------- model
def build_meta_model(cfg: Config) -> torch.nn.Module:
    """The model ``crossflow train`` would build for ``cfg`` and its task (``trainer.tasks``: the
    flow's shape, the source's and target's parts, the same args), on the meta device (no memory)."""
    mi = with_flow_shape(cfg, declared_model_input(cfg))
    args = task_model_args(cfg, mi.latent_shape, mi.text_dim, caption_vocab(cfg))
    with torch.device("meta"):
        return model_from_args(args)


def caption_vocab(cfg: Config) -> int:
    """The caption target's vocabulary (data.text_encoder's tokenizer; no weights loaded); 0 for other targets."""
    if cfg.task.target != "caption":
        return 0
    from data_pipeline.features import text_encoder_vocab
    vocab = text_encoder_vocab(cfg.data.text_encoder)
    if vocab is None:
        raise ValueError(f"the caption decoder's vocabulary is data.text_encoder's, but {cfg.data.text_encoder} "
                         f"is not a folder here: point data.text_encoder at the local model folder")
    return vocab


# ----------------------------------------------------------------------------- FLOP budgets
def format_flops(flops: float) -> str:
    """A FLOP count as written in configs and run names: 2e12, 6.5e12, 1.2e20."""
    mantissa, _, exponent = f"{flops:.4g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def steps_for_target_flops(cfg: Config, flops_per_sample: float | None = None) -> int:
    """The run's optimizer steps: ``train.steps``, or with ``train.target_flops`` > 0 (nanochat's
    ``--target-flops``) round(target_flops / (flops_per_sample x train.global_batch_size)), where
    flops_per_sample is the model's own ``flops_per_sample()`` (of ``cfg``'s meta-device build
    unless given). A budget that buys fewer than one step, or fewer than ``optim.warmup_steps``, is a
    ConfigError naming the budget, the FLOPs per sample and the batch."""
    t = cfg.train
    if t.target_flops <= 0:
        return t.steps
    per_sample = flops_per_sample or build_meta_model(cfg).flops_per_sample()
    per_step = per_sample * t.global_batch_size
    steps = round(t.target_flops / per_step)
    floor = max(1, cfg.optim.warmup_steps)
    if steps < floor:
        what = "one step" if floor == 1 else f"optim.warmup_steps={floor}"
        m = cfg.model
        model = ", ".join(f"model.{k}={v}" for k, v in (("family", m.family), ("preset", m.preset),
                                                        ("hidden_size", m.hidden_size), ("depth", m.depth)) if v)
        raise ConfigError(f"train.target_flops={format_flops(t.target_flops)} buys {t.target_flops / per_step:.3g} "
                          f"steps of {per_sample:.4g} FLOPs per sample ({model}) x train.global_batch_size="
                          f"{t.global_batch_size}, fewer than {what}: raise the budget to at least "
                          f"{format_flops(floor * per_step)}, or lower train.global_batch_size or optim.warmup_steps")
    return steps


def with_target_flops(cfg: Config, flops_per_sample: float | None = None, announce: bool = False) -> Config:
    """``cfg`` with ``train.steps`` set by ``steps_for_target_flops`` (a copy; ``cfg`` itself when
    ``train.target_flops`` is 0). The budget wins over a ``train.steps`` the config also sets;
    ``announce`` prints once what the budget gave and the ``train.steps`` it replaced."""
    if cfg.train.target_flops <= 0:
        return cfg
    per_sample = flops_per_sample or build_meta_model(cfg).flops_per_sample()
    steps = steps_for_target_flops(cfg, per_sample)
    check_two_stage_length(cfg.objective, steps)
    if announce:
        replaced = f"; replaces train.steps={cfg.train.steps}" if steps != cfg.train.steps else ""
        print(f"train.target_flops={format_flops(cfg.train.target_flops)}: {steps} steps x global batch "
              f"{cfg.train.global_batch_size} x {per_sample:.4g} FLOPs per sample{replaced}", flush=True)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


# ----------------------------------------------------------------------------- formulas
def block_activation_elements(s: BlockStack) -> float:
    """Elements one block of the stack keeps for backward, per sample."""
    a = s.tokens * s.width * (13 + 2 * s.mlp_ratio)
    if s.cross_tokens:
        a += 5 * s.tokens * s.width + 2 * s.cross_tokens * s.width
    return a


def activation_bytes_per_sample(stacks: list[BlockStack], act_bytes: int, checkpointing: bool) -> float:
    outside = sum(ACTIVATION_ELEMENTS_PER_TOKEN_OUTSIDE_BLOCKS * s.tokens * s.width for s in stacks)
    if not checkpointing:
        return act_bytes * (outside + sum(s.depth * block_activation_elements(s) for s in stacks))
    kept = sum(s.depth * s.tokens * s.width for s in stacks if s.checkpointed)
    full = sum(s.depth * block_activation_elements(s) for s in stacks if not s.checkpointed)
    recompute = max((block_activation_elements(s) for s in stacks if s.checkpointed), default=0.0)
    return act_bytes * (outside + kept + full + recompute)


def state_bytes(P: int, world: int, zero_stage: int, weight_bytes: int, offload: bool, ema: bool) -> dict[str, float]:
    """Per-GPU bytes of the model state (see the module docstring); ``host`` is offloaded state."""
    part = P / world
    # allocated whole on the GPU, however small the model (on CPU only the touched part counts in RSS)
    bucket = weight_bytes * REDUCE_BUCKET_ELEMENTS if zero_stage >= 2 else 0.0
    fp32_grads = 4 * part
    optimizer = 12 * part
    out = {
        "weights": weight_bytes * (part if zero_stage == 3 else P),
        "gradients": (weight_bytes * P if zero_stage == 1 else bucket) + (0.0 if offload else fp32_grads),
        "optimizer": 0.0 if offload else optimizer,
        "ema": (4 * (part if zero_stage == 3 else P)) if ema else 0.0,
        "step_temporaries": 0.0 if offload else 4 * part,
        "host": (fp32_grads + optimizer) if offload else 0.0,
    }
    return out


def comm_bytes_per_step(P: int, world: int, zero_stage: int, weight_bytes: int, grad_accum: int) -> float:
    """Bytes each GPU sends per optimizer step (ring reduce-scatter / all-gather: (N-1)/N of the tensor)."""
    if world == 1:
        return 0.0
    one = (world - 1) / world * P * weight_bytes  # one reduce-scatter or all-gather of all parameters
    if zero_stage == 1:
        return 2 * one
    if zero_stage == 2:
        return grad_accum * one + one
    return 3 * grad_accum * one


def _micro_batch(cfg: Config, world: int, notes: list[str]) -> int:
    try:
        return per_rank_batch_size(cfg.train.global_batch_size, world, cfg.train.grad_accum)
    except ConfigError as e:
        notes.append(f"the config's own micro-batch: {e}")
        return max(1, cfg.train.global_batch_size // (world * cfg.train.grad_accum))


# ----------------------------------------------------------------------------- the plan
def make_plan(cfg: Config, hw: Hardware = Hardware(), micro_batch: int | None = None,
              config_name: str = "") -> Plan:
    model = build_meta_model(cfg)
    fam = family_of(model)
    t = cfg.train
    world = cfg.cluster.num_workers
    notes: list[str] = []
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    wb = 2 if t.precision == "bf16" else 4
    state = state_bytes(P, world, t.zero_stage, wb, t.offload_optimizer, t.ema_decay > 0)
    stacks = fam.block_stacks(model.args)
    per_sample = {ac: activation_bytes_per_sample(stacks, wb, ac) for ac in (False, True)}
    if t.precision == "bf16":
        per_sample[True] *= AC_BF16_MEASURED_RATIO
    act = per_sample[t.activation_checkpointing]
    static = state["weights"] + state["gradients"] + state["optimizer"] + state["ema"]
    budget = hw.gpu_memory_gb * GIB - FIXED_OVERHEAD_GIB * GIB

    def totals(m: int) -> tuple[float, float]:
        allocated = static + max(m * act, state["step_temporaries"])
        return allocated, allocated * (1 + ALLOCATOR_SLACK) + FIXED_OVERHEAD_GIB * GIB

    if t.zero_stage >= 2 and REDUCE_BUCKET_ELEMENTS > P:
        notes.append(f"gradients include DeepSpeed's ZeRO-{t.zero_stage} reduce bucket of {REDUCE_BUCKET_ELEMENTS:.0e} "
                     f"elements ({wb * REDUCE_BUCKET_ELEMENTS / GIB:.2f} GiB), allocated whole however small the model")
    mb = micro_batch or _micro_batch(cfg, world, notes)
    accum = max(1, cfg.train.global_batch_size // (world * mb))
    allocated, total = totals(mb)
    max_mb = max(0, math.floor((budget / (1 + ALLOCATOR_SLACK) - static) / act))
    best = next((m for m in range(min(max_mb, t.global_batch_size // world), 0, -1)
                 if t.global_batch_size % (world * m) == 0), 0)
    if best == 0:
        notes.append(f"no micro-batch of train.global_batch_size={t.global_batch_size} over {world} GPUs fits "
                     f"{hw.gpu_memory_gb:g} GiB: raise cluster.num_workers or train.zero_stage, set "
                     f"train.activation_checkpointing=true or train.offload_optimizer=true")
    flops = model.flops_per_sample()
    hw_flops = flops * (4 / 3 if t.activation_checkpointing else 1.0)
    compute_s = hw_flops * t.global_batch_size / (world * hw.peak_tflops * 1e12 * hw.mfu)
    comm_accum = t.global_batch_size // (world * best) if best else accum
    comm = comm_bytes_per_step(P, world, t.zero_stage, wb, comm_accum)
    comm_s = comm / (hw.bandwidth_gbps * 1e9 / 8)
    steps = steps_for_target_flops(cfg, flops)
    mi = with_flow_shape(cfg, declared_model_input(cfg))
    tokens = mi.image_tokens(model.args.patch_size)
    memory = {k: v / GIB for k, v in state.items() if k not in ("host", "step_temporaries")}
    memory["activations"] = mb * act / GIB
    memory["step_temporaries"] = state["step_temporaries"] / GIB
    memory["overhead"] = (total - allocated) / GIB
    return Plan(
        config=config_name, family=cfg.model.family, preset=cfg.model.preset,
        latent_shape=tuple(mi.latent_shape), text_dim=mi.text_dim, max_tokens=cfg.data.max_tokens,
        params=fam.param_counts(model), trainable_params=P, flow_params=model.flow_params(), flops_per_sample=flops,
        tokens_per_sample=tokens,
        world_size=world, zero_stage=t.zero_stage, precision=t.precision, offload_optimizer=t.offload_optimizer,
        activation_checkpointing=t.activation_checkpointing, global_batch_size=t.global_batch_size,
        micro_batch=mb, grad_accum=accum, memory_gib=memory,
        activation_gib_per_sample={"without_ac": per_sample[False] / GIB, "with_ac": per_sample[True] / GIB},
        host_gib=state["host"] / GIB, allocated_gib=allocated / GIB, total_gib=total / GIB,
        hardware=dataclasses.asdict(hw), fits=total <= hw.gpu_memory_gb * GIB, max_micro_batch=max_mb,
        best_micro_batch=best, best_grad_accum=t.global_batch_size // (world * best) if best else 0,
        comm_gb_per_step=comm / 1e9, comm_s_per_step=comm_s, compute_s_per_step=compute_s,
        bound="network" if comm_s > compute_s else "compute", notes=notes, target_flops=t.target_flops,
        steps=steps, training_flops=steps * t.global_batch_size * flops, task=mi.task)


def format_plan(p: Plan) -> str:
    hw = p.hardware
    C, H, W = p.latent_shape
    task = "" if p.task == "text_to_image" else f", task {p.task}"
    lines = [f"crossflow plan: {p.config or 'config'}  ({p.family}, preset {p.preset}{task})",
             f"  input: latent {C}x{H}x{W}, text {p.max_tokens} x {p.text_dim}-d; {p.tokens_per_sample} image tokens",
             "  parameters:"]
    lines += [f"    {name:<22}{n / 1e6:>10.1f} M" for name, n in p.params.items() if n]
    lines += [f"    {'trainable, all':<22}{p.trainable_params / 1e6:>10.1f} M",
              f"  training FLOPs per sample: {p.flops_per_sample / 1e12:.3f} TFLOP (flow network)",
              f"  training: {p.steps} steps x global batch {p.global_batch_size} = "
              f"{format_flops(p.training_flops)} FLOPs"
              + (f" (train.target_flops={format_flops(p.target_flops)})" if p.target_flops else ""),
              f"  per GPU: world {p.world_size}, ZeRO-{p.zero_stage}, {p.precision}, "
              f"offload {'on' if p.offload_optimizer else 'off'}, activation checkpointing "
              f"{'on' if p.activation_checkpointing else 'off'}, micro-batch {p.micro_batch} x grad_accum "
              f"{p.grad_accum} (global {p.global_batch_size})"]
    lines += [f"    {name.replace('_', ' '):<22}{gib:>10.2f} GiB" for name, gib in p.memory_gib.items()]
    lines += [f"    {'allocated (peak)':<22}{p.allocated_gib:>10.2f} GiB   (torch.cuda.max_memory_allocated)",
              f"    {'total':<22}{p.total_gib:>10.2f} GiB   of {hw['gpu_memory_gb']:g}: "
              f"{'fits' if p.fits else 'DOES NOT FIT'}"]
    if p.host_gib:
        lines.append(f"    {'host (offloaded)':<22}{p.host_gib:>10.2f} GiB per worker")
    a = p.activation_gib_per_sample
    lines += [f"  activations per sample: {a['without_ac'] * 1024:.1f} MiB without AC, "
              f"{a['with_ac'] * 1024:.1f} MiB with AC",
              f"  largest micro-batch in {hw['gpu_memory_gb']:g} GiB: {p.max_micro_batch}; for global batch "
              f"{p.global_batch_size} on {p.world_size} GPU(s): micro-batch {p.best_micro_batch} x grad_accum "
              f"{p.best_grad_accum}",
              f"  per step: {p.comm_gb_per_step:.2f} GB sent per GPU -> {p.comm_s_per_step:.3f} s at "
              f"{hw['bandwidth_gbps']:g} Gbit/s; compute {p.compute_s_per_step:.3f} s at {hw['mfu']:.0%} MFU of "
              f"{hw['peak_tflops']:g} TFLOP/s: {p.bound}-bound"]
    lines += [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- crossflow train's check
def is_gpu_run(cfg: Config, use_ray: bool) -> bool:
    if use_ray:
        return cfg.cluster.gpus_per_worker > 0
    return cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())


def check_memory_at_start(cfg: Config, world: int, use_ray: bool = True) -> None:
    """``crossflow train``, before any worker starts: refuse (ConfigError with the numbers) a GPU run
    whose estimate exceeds the GPU memory; on CPU runs print the estimate only (the workers share the
    host's memory with everything else, and peak RSS is not what the plan models)."""
    if not cfg.train.memory_check:
        return
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, num_workers=world))
    gpu = is_gpu_run(cfg, use_ray and cfg.cluster.use_ray)
    gib = cfg.train.gpu_memory_gb
    if gpu and not gib and torch.cuda.is_available():
        gib = torch.cuda.get_device_properties(0).total_memory / GIB
    try:
        plan = make_plan(cfg, Hardware(gpu_memory_gb=gib or 80.0))
    except ConfigError:  # e.g. a train.target_flops under one step: refused here, before any worker
        raise
    except ValueError as e:  # e.g. a text encoder whose width is not known without loading it
        print(f"crossflow: memory check skipped: {e}", file=sys.stderr)
        return
    summary = (f"{plan.total_gib:.2f} GiB per worker (weights {plan.memory_gib['weights']:.2f}, gradients "
               f"{plan.memory_gib['gradients']:.2f}, optimizer {plan.memory_gib['optimizer']:.2f}, EMA "
               f"{plan.memory_gib['ema']:.2f}, activations {plan.memory_gib['activations']:.2f} for micro-batch "
               f"{plan.micro_batch}, overhead {plan.memory_gib['overhead']:.2f})")
    if not gpu:
        print(f"crossflow: plan estimate {summary}; CPU run: not checked", file=sys.stderr)
        return
    if not gib:
        print(f"crossflow: plan estimate {summary}; not checked: set train.gpu_memory_gb", file=sys.stderr)
        return
    if not plan.fits:
        hint = (f"micro-batch {plan.best_micro_batch} x train.grad_accum={plan.best_grad_accum} fits"
                if plan.best_micro_batch else "no micro-batch fits")
        raise ConfigError(f"the run needs about {summary}, more than the {gib:.1f} GiB of GPU memory: {hint} "
                          f"(`crossflow plan` shows the details; train.memory_check=false skips this check)")
    print(f"crossflow: plan estimate {summary} of {gib:.1f} GiB", file=sys.stderr)
