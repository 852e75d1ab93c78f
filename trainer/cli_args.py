"""Arguments shared by the commands that sample a checkpoint (``crossflow sample``, ``interpolate``,
``arithmetic``, ``eval ...``): one definition, one help text."""
from __future__ import annotations

import argparse


def add_sampling_args(p: argparse.ArgumentParser, checkpoint_required: bool = True, seed_help: str = "") -> None:
    """--checkpoint, the ODE's --cfg-scale/--steps/--solver and --z0 (defaulting to the checkpoint's
    config), --seed, --device and --vae."""
    p.add_argument("--checkpoint", required=checkpoint_required,
                   help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance scale (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the config's)")
    p.add_argument("--solver", choices=("euler", "heun"), default=None, help="ODE solver (default: the config's)")
    p.add_argument("--seed", type=int, default=0, help=seed_help or "seed of z0 = mu + sigma * eps")
    p.add_argument("--z0", choices=("mean", "sampled"), default=None,
                   help="start the flow from the Text VE's mean or from mu + sigma * eps (the paper's sampling); "
                        "default: the config's sample.use_mean")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--vae", default=None,
                   help="local diffusers AutoencoderKL folder that decodes the model's latents (default: the one "
                        "the checkpoint's metadata names; must match its channels, downsampling and scaling)")


def generator_from_args(args: argparse.Namespace):
    """The checkpoint's Generator as ``add_sampling_args``' arguments ask for it."""
    from trainer.inference import load_generator
    use_mean = None if args.z0 is None else args.z0 == "mean"
    return load_generator(args.checkpoint, args.device, vae=args.vae, use_mean=use_mean)
