"""``crossflow`` command line: parse, dispatch, nothing else."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.cli_args import add_sampling_args

OVERRIDES_HELP = "config overrides as section.key=value (e.g. optim.lr=3e-4 train.steps=200)"


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command as ``nproc`` processes on this node under torchrun (gloo on CPU, nccl on GPU)."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "trainer.cli", *argv]
    return subprocess.call(cmd)


def _train(args: argparse.Namespace) -> int:
    import os

    from trainer.config import load_config
    cfg = load_config(args.config, args.overrides)  # fail on a bad config before any worker starts
    if (cfg.cluster.use_ray and not args.no_ray or (args.nproc or 1) > 1) and "RANK" not in os.environ:
        from trainer.loop import check_data_before_launch
        try:  # shards, metadata, config and autoencoder that disagree fail here, not in every worker
            check_data_before_launch(cfg)
        except (ValueError, FileNotFoundError) as e:
            print(f"crossflow: data error: {e}", file=sys.stderr)
            return 2
    if "RANK" not in os.environ:  # the launcher, once: refuse a run that cannot fit the GPU memory
        from trainer.plan import check_memory_at_start
        use_ray = cfg.cluster.use_ray and not args.no_ray
        check_memory_at_start(cfg, (args.nproc or cfg.cluster.num_workers) if use_ray else (args.nproc or 1), use_ray)
    if cfg.cluster.use_ray and not args.no_ray and "RANK" not in os.environ:
        from cluster.ray_train import run_training  # Ray Train: embedded cluster unless an address is given
        cfg.cluster.address = args.address or cfg.cluster.address
        cfg.cluster.num_workers = args.nproc or cfg.cluster.num_workers
        summary = run_training(cfg)
    elif (args.nproc or 1) > 1 and "RANK" not in os.environ:
        return launch_torchrun(args.nproc, ["train", "--config", args.config, *args.overrides])
    else:
        from trainer.loop import train
        summary = train(cfg)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0
    if summary.get("stopped"):
        print(f"stopped at step {summary['steps']}: checkpoint {summary['checkpoint']} "
              f"(continue with train.resume=auto)")
        return 0
    if summary["first_loss"] is not None:
        print(f"trained {summary['steps']} steps: loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    else:
        print(f"nothing to train: already at step {summary['steps']}")
    print(f"checkpoint: {summary['checkpoint']}")
    print(f"samples:    {summary['samples']}")
    if "shapes_eval/overall" in summary:
        tasks = " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in summary.items()
                         if k.startswith("shapes_eval/") and not k.endswith(("n_prompts", "n_images")))
        print(f"ShapesEval: {tasks}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from trainer.inference import image_grid, load_generator
    gen = load_generator(args.checkpoint, args.device, vae=args.vae)
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
    from trainer.inference import load_generator
    gen = load_generator(args.checkpoint, args.device, vae=args.vae)
    _strip(args, gen.interpolation(args.a, args.b, args.num, args.seed, steps=args.steps,
                                   solver=args.solver, cfg_scale=args.cfg_scale))
    return 0


def _arithmetic(args: argparse.Namespace) -> int:
    from trainer.inference import load_generator
    terms = parse_arithmetic(args.terms)
    gen = load_generator(args.checkpoint, args.device, vae=args.vae)
    _strip(args, gen.arithmetic(terms, args.seed, steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossflow", description=(
        "Train and sample CrossFlow: text-to-image flow matching from the text's latent, "
        "no noise source and no cross-attention (arXiv 2412.15213)."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a YAML config",
                       description="Train CrossFlow. Values: dataclass defaults <- --config YAML <- overrides.")
    p.add_argument("--config", default="configs/demo.yaml", help="YAML config file (default: configs/demo.yaml)")
    p.add_argument("--nproc", type=int, default=None,
                   help="training processes (one per GPU, or CPU workers on gloo): Ray workers "
                        "(cluster.num_workers), or with --no-ray torchrun processes on this node")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join (auto, host:port); default: RAY_ADDRESS, else an embedded local cluster")
    p.add_argument("--no-ray", action="store_true",
                   help="debugging: train in this process (or under torchrun with --nproc), without Ray")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_train)

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

    from trainer.plan import add_plan_command  # `crossflow plan`
    add_plan_command(sub)
    from data_pipeline.cli import add_data_commands  # `crossflow data convert|features`
    add_data_commands(sub)
    from trainer.eval.cli import add_eval_commands  # `crossflow eval shapes|fid|clip`
    add_eval_commands(sub)
    from trainer.sweep_cli import add_sweep_commands  # `crossflow sweep analyze`
    sweep_sub = add_sweep_commands(sub)
    from cluster.sweep import add_sweep_run_command  # `crossflow sweep run` (Ray imported lazily)
    add_sweep_run_command(sweep_sub)
    from cluster.cli import add_cluster_commands  # `crossflow submit`, `crossflow jobs ...` (Ray imported lazily)
    add_cluster_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] != "--help":
        argv.insert(1, "run")  # `crossflow sweep --config X` is `crossflow sweep run --config X`
    args = build_parser().parse_args(argv)
    from trainer.config import ConfigError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"crossflow: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
