"""The trainer's commands of ``crossflow`` (sample, interpolate, arithmetic, caption, export, config, plan, eval,
sweep analyze): parse, dispatch, nothing else. The entry point that registers every command group,
``train`` included, is cluster/cli.py (the top layer: it may launch on Ray)."""
from __future__ import annotations

import argparse
from pathlib import Path

from trainer.cli_args import add_flow_args, add_sampling_args, generator_from_args, task_predictor_from_args

OVERRIDES_HELP = "config overrides as section.key=value (e.g. optim.lr=3e-4 train.steps=200)"


def print_summary(summary: dict) -> None:
    """What a finished (or stopped) training run tells the person who started it (rank 0)."""
    if summary.get("stopped"):
        print(f"stopped at step {summary['steps']}: checkpoint {summary['checkpoint']} "
              f"(continue with train.resume=auto)")
        return
    if summary["first_loss"] is not None:
        print(f"trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    else:
        print(f"nothing to train: already at step {summary['steps']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"samples:    {summary['samples']}")
    if "shapes_eval/overall" in summary:
        tasks = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in summary.items()
                         if k.startswith("shapes_eval/") and "@" not in k and not k.endswith(("n_prompts", "n_images")))
        print(f"ShapesEval: {tasks}")
        by_scale = " ".join(f"{k.split('@')[1]}={v:.3f}" for k, v in summary.items()
                            if k.startswith("shapes_eval/overall@"))
        if by_scale:
            print(f"ShapesEval overall by guidance scale: {by_scale}")
    task = {k.split("/", 1)[1]: v for k, v in summary.items() if k.startswith("task/")}
    if task:
        print("task metric (model vs baseline): " + " ".join(
            f"{k}={v:.4f} ({task.get('baseline_' + k, float('nan')):.4f})" for k, v in task.items()
            if not k.startswith("baseline_")))


def _sample(args: argparse.Namespace) -> int:
    from trainer.inference import image_grid
    gen = generator_from_args(args)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("crossflow sample: give --prompt TEXT (repeatable) or --prompts FILE")
    kw = dict(steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale)
    per_seed = [gen.generate(prompts, seed=args.seed + k, **kw) for k in range(args.per_prompt)]
    rows = [[per_seed[k][i] for k in range(args.per_prompt)] for i in range(len(prompts))]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale=args.scale).save(out)
    print(f"wrote {out}: {len(prompts)} prompt(s) x {args.per_prompt} sample(s)")
    return 0


def parse_arithmetic(tokens: list[str]) -> list[tuple[float, str]]:
    """["a", "-", "b", "+", "c"] -> [(1, "a"), (-1, "b"), (1, "c")]."""
    terms, sign = [], 1.0
    expect_prompt = True
    for tok in tokens:
        if tok in ("+", "-") and not expect_prompt:
            sign, expect_prompt = (1.0 if tok == "+" else -1.0), True
        elif expect_prompt and tok not in ("+", "-"):
            terms.append((sign, tok))
            expect_prompt = False
        else:
            raise SystemExit(f"crossflow arithmetic: expected PROMPT (+|-) PROMPT ..., got {tokens}")
    if expect_prompt or len(terms) < 2:
        raise SystemExit(f"crossflow arithmetic: expected PROMPT (+|-) PROMPT ..., got {tokens}")
    return terms


def _strip(args: argparse.Namespace, images) -> None:
    from trainer.inference import image_grid
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid([images], scale=args.scale).save(out)
    print(f"wrote {out}: {len(images)} images")


def _interpolate(args: argparse.Namespace) -> int:
    gen = generator_from_args(args)
    _strip(args, gen.interpolation(args.a, args.b, args.num, args.seed, steps=args.steps,
                                   solver=args.solver, cfg_scale=args.cfg_scale))
    return 0


def _arithmetic(args: argparse.Namespace) -> int:
    terms = parse_arithmetic(args.terms)
    gen = generator_from_args(args)
    _strip(args, gen.arithmetic(terms, args.seed, steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale))
    return 0


def read_images(paths: list[str], side: int, command: str) -> list:
    """Image files as (side, side, 3) uint8 RGB (resized bicubically when another size); a missing or
    unreadable file is an error naming it, before any sampling."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"{command}: image not found: {path}")
        try:
            im = Image.open(path).convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise SystemExit(f"{command}: cannot read image {path}: {e}") from e
        if im.size != (side, side):
            im = im.resize((side, side), Image.BICUBIC)
        images.append(np.asarray(im, dtype=np.uint8))
    return images


def _caption(args: argparse.Namespace) -> int:
    for path in args.image:  # before loading the checkpoint
        if not Path(path).is_file():
            raise SystemExit(f"crossflow caption: image not found: {path}")
    predictor = task_predictor_from_args(args, "captioning", "crossflow caption")
    images = read_images(args.image, predictor.config.data.resolution, "crossflow caption")
    captions = predictor.predict(images, seed=args.seed, steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale)
    for path, text in zip(args.image, captions):
        print(f"{path}: {text or '(empty: the decoder gave only special or padding tokens)'}")
    return 0


def _ode_args(p: argparse.ArgumentParser) -> None:
    add_sampling_args(p)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscaling of the output")


def _export(args: argparse.Namespace) -> int:
    from trainer.export import export_checkpoint
    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}")
    return 0


def _config(args: argparse.Namespace) -> int:
    from trainer.config import describe, load_config
    print(describe(load_config(args.config, args.overrides)))
    return 0


def _plan(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from trainer.config import ConfigError, load_config
    from trainer.plan import Hardware, format_plan, make_plan
    cfg = load_config(args.config, args.overrides)
    given = {k: getattr(args, k) for k in ("gpu_memory_gb", "bandwidth_gbps", "mfu", "peak_tflops")}
    hw = Hardware(**{k: v for k, v in given.items() if v is not None})  # the rest: Hardware's defaults
    try:
        plan = make_plan(cfg, hw, args.micro_batch, args.config)
    except ValueError as e:  # e.g. data.text_dim needed: reported like any config error
        raise ConfigError(str(e)) from e
    print(json.dumps(dataclasses.asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0


def add_trainer_commands(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Register the commands on a trained model and the training tools: sample, interpolate,
    arithmetic, caption, export, config, plan, eval, sweep analyze. Returns ``sweep``'s subcommands (the
    cluster layer adds ``sweep run``). ``train`` itself, which may launch on Ray, is cluster.cli's."""
    p = sub.add_parser("sample", help="generate an image grid from prompts",
                       description="Sample a trained checkpoint with the EMA weights and classifier-free guidance; "
                                   "latent-space models decode through the autoencoder their checkpoint names "
                                   "(or --vae).")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompts", help="a text file with one prompt per line")
    p.add_argument("--out", default="samples.png", help="output PNG (one row per prompt)")
    p.add_argument("--per-prompt", type=int, default=4, help="samples per prompt (seeds seed, seed+1, ...)")
    _ode_args(p)
    p.set_defaults(func=_sample)

    p = sub.add_parser("interpolate", help="image strip along the z0 line between two prompts",
                       description="Linear interpolation in z0 space between prompt A and prompt B "
                                   "(the paper's Figure 4); writes one strip, A on the left.")
    p.add_argument("a", help="first prompt")
    p.add_argument("b", help="second prompt")
    p.add_argument("--num", type=int, default=7, help="images in the strip, endpoints included")
    p.add_argument("--out", default="interpolation.png", help="output PNG")
    _ode_args(p)
    p.set_defaults(func=_interpolate)

    p = sub.add_parser("arithmetic", help="z0 arithmetic: A - B + C ...",
                       description="Add and subtract prompts' z0 and re-standardize the result (the paper's "
                                   "Figure 5). Writes the operands' images, then the result's, in one strip. "
                                   "Example: crossflow arithmetic 'a red circle on the left' - 'a red circle "
                                   "on the left' + 'a blue square at the top' --checkpoint runs/demo")
    p.add_argument("terms", nargs="+", help="PROMPT (+|-) PROMPT ...")
    p.add_argument("--out", default="arithmetic.png", help="output PNG")
    _ode_args(p)
    p.set_defaults(func=_arithmetic)

    p = sub.add_parser("caption", help="caption images with a captioning checkpoint",
                       description="Caption each image with a captioning checkpoint (task.target=caption): the image "
                                   "VE's z0 flows to the text latent, the caption decoder reads it out (argmax tokens). "
                                   "Images of another size are resized to the checkpoint's data.resolution. Prints "
                                   "'PATH: caption', one line per image.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--image", action="append", required=True, help="an image file (PNG, JPEG, ...); repeat for several")
    add_flow_args(p)
    p.set_defaults(func=_caption)

    p = sub.add_parser("export", help="one consolidated safetensors file (model + EMA) from a checkpoint",
                       description="Consolidate a DeepSpeed checkpoint (any ZeRO stage) into one safetensors file "
                                   "holding the live weights (model.*) and the EMA (ema.*), with the model args, config and "
                                   "feature metadata (the autoencoder folder) as metadata. `crossflow sample "
                                   "--checkpoint FILE` loads it without DeepSpeed.")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=_export)

    p = sub.add_parser("config", help="print every config key with its value and help",
                       description="Resolve a config (file + overrides), validate it, print it with help texts.")
    p.add_argument("--config", default=None, help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_config)

    # `crossflow plan`: registered here, trainer.plan (torch, the model code) loaded when it runs, so
    # that every other command, `crossflow jobs status` too, starts without importing torch
    p = sub.add_parser("plan", help="memory, FLOPs and communication of a config, per GPU, before it runs",
                       description="Build the config's model on the meta device and estimate, per GPU: parameters "
                                   "per component, FLOPs, memory of weights, gradients, optimizer state, EMA and "
                                   "activations under its ZeRO stage, world size (cluster.num_workers), micro-batch, "
                                   "activation checkpointing and offload; the largest micro-batch that fits and the "
                                   "grad_accum that reaches train.global_batch_size; bytes sent per step and whether "
                                   "the step is compute- or network-bound. Formulas: trainer/plan.py.")
    p.add_argument("--config", required=True, help="YAML config file")
    p.add_argument("--gpu-memory-gb", type=float, default=None, help="GPU memory in GiB (default 80)")
    p.add_argument("--bandwidth-gbps", type=float, default=None,
                   help="interconnect bandwidth per GPU in Gbit/s (default 400: one NDR InfiniBand NIC per GPU)")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilization for the compute time (0.45)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s per GPU (default 989: H100 dense bf16)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="micro-batch per GPU for the memory rows (default: global batch / (world x grad_accum))")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("overrides", nargs="*", help="config overrides as section.key=value (e.g. cluster.num_workers=1)")
    p.set_defaults(func=_plan)
    from trainer.eval.cli import add_eval_commands  # `crossflow eval shapes|fid|clip`
    add_eval_commands(sub)
    from trainer.sweep_cli import add_sweep_commands  # `crossflow sweep analyze`
    return add_sweep_commands(sub)


