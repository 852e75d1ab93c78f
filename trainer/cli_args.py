"""Arguments shared by the commands that sample a checkpoint (``crossflow sample``, ``interpolate``,
``arithmetic``, ``eval ...``, ``caption``): one definition, one help text."""
from __future__ import annotations

import argparse


def add_flow_args(p: argparse.ArgumentParser, seed_help: str = "") -> None:
    """The ODE's --cfg-scale/--steps/--solver and --z0 (defaulting to the checkpoint's config), --seed, --device."""
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the config's)")
    p.add_argument("--solver", choices=("euler", "heun"), default=None, help="ODE solver (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help=seed_help or "seed of z0 = mu + sigma * eps")
    p.add_argument("--z0", choices=("mean", "sampled"), default=None,
                   help="start the flow from the VE's mean or from mu + sigma * eps (the paper's sampling); "
                        "default: the config's sample.use_mean")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def add_sampling_args(p: argparse.ArgumentParser, checkpoint_required: bool = True, seed_help: str = "") -> None:
    """--checkpoint, ``add_flow_args``' arguments and --vae."""
    p.add_argument("--checkpoint", required=checkpoint_required,
                   help="checkpoint directory, or a run directory (its latest)")
    add_flow_args(p, seed_help)
    p.add_argument("--vae", default=None,
                   help="local diffusers AutoencoderKL folder that decodes the model's latents (default: the one "
                        "the checkpoint's metadata names; must match its channels, downsampling and scaling)")


def use_mean_from_args(args: argparse.Namespace) -> bool | None:
    """--z0 as ``use_mean``: None keeps the checkpoint's sample.use_mean."""
    return None if args.z0 is None else args.z0 == "mean"


def require_task(checkpoint: str, task: str, command: str) -> None:
    """Refuse, before any weights load, a checkpoint trained for another task than ``task`` (a name of
    ``trainer.tasks.TASKS``), naming both."""
    from trainer.checkpoint import read_checkpoint_metadata
    from trainer.config import config_from_dict
    from trainer.task_inference import task_description
    from trainer.tasks import task_of
    _, config, _ = read_checkpoint_metadata(checkpoint)
    cfg = config_from_dict(config)
    if task_of(cfg).name != task:
        raise SystemExit(f"{command}: {checkpoint} is a checkpoint of {task_description(cfg)}, not of {task}")


def generator_from_args(args: argparse.Namespace):
    """The checkpoint's Generator as ``add_sampling_args``' arguments ask for it (text-to-image only)."""
    from trainer.inference import load_generator
    require_task(args.checkpoint, "text_to_image", f"crossflow {getattr(args, 'command', 'sample')}")
    return load_generator(args.checkpoint, args.device, vae=args.vae, use_mean=use_mean_from_args(args))


def task_predictor_from_args(args: argparse.Namespace, task: str, command: str):
    """The checkpoint's TaskPredictor for ``task`` as ``add_flow_args``' arguments ask for it; a
    checkpoint of another task is refused before its weights load, naming both."""
    from trainer.task_inference import load_task_predictor
    require_task(args.checkpoint, task, command)
    return load_task_predictor(args.checkpoint, args.device, vae=getattr(args, "vae", None),
                               use_mean=use_mean_from_args(args))
