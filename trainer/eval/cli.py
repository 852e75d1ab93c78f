"""``crossflow eval shapes|fid|clip|superres|depth|caption``: registered on the main parser by ``add_eval_commands``.

Also the trainer-facing ``sample_shapes_eval``: sample the ShapesEval suite with anything that has
``generate(prompts, seed=..., **kw) -> list[(H, W, 3) uint8]`` (``trainer.inference.Generator``)
and score it. Heavy imports (torch, the model) happen inside the command functions.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from trainer.cli_args import add_flow_args, add_sampling_args, generator_from_args, task_predictor_from_args
from trainer.eval.shapes_eval import ShapesEvalReport, evaluate, prompt_suite, render_suite

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def sample_shapes_eval(generator, max_groups: int = 1, images_per_prompt: int = 4, seed: int = 0,
                       **sample_kw) -> ShapesEvalReport:
    """Generate ``images_per_prompt`` images (seeds ``seed``, ``seed + 1``, ...) for every
    ShapesEval prompt and score them. ``sample_kw`` (steps, solver, cfg_scale) go to ``generate``."""
    suite = prompt_suite(max_groups)
    captions = [p.caption for p in suite]
    per_seed = [generator.generate(captions, seed=seed + k, **sample_kw) for k in range(images_per_prompt)]
    images = [[per_seed[k][j] for k in range(images_per_prompt)] for j in range(len(suite))]
    return evaluate(images, suite)


def load_image_dir(path: str | Path, resolution: int | None = None) -> list[np.ndarray]:
    """Every image file directly in ``path`` as (H, W, 3) uint8, resized to ``resolution`` if given."""
    from PIL import Image
    files = sorted(f for f in Path(path).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {str(path)!r}")
    out = []
    for f in files:
        im = Image.open(f).convert("RGB")
        if resolution is not None and im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BICUBIC)
        out.append(np.asarray(im, dtype=np.uint8))
    return out


def _read_prompts(path: str | None, max_groups: int) -> list[str]:
    if path is None:
        return [p.caption for p in prompt_suite(max_groups)]
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"crossflow eval: no prompts in {path}")
    return prompts


def _generate(args: argparse.Namespace, prompts: list[str]):
    """(images in prompt order, repeated per seed; the prompts matching them; the generator)."""
    gen = generator_from_args(args)
    kw = dict(steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale)
    images, matched = [], []
    for k in range(args.per_prompt):
        images += gen.generate(prompts, seed=args.seed + k, **kw)
        matched += prompts
    return images, matched, gen


def _eval_shapes(args: argparse.Namespace) -> int:
    if args.self_check:
        max_groups = args.max_groups or 1
        suite = prompt_suite(max_groups)
        report = evaluate(render_suite(suite, args.resolution, args.per_prompt, args.seed), suite)
    else:
        if not args.checkpoint:
            raise SystemExit("crossflow eval shapes: give --checkpoint (or --self-check)")
        gen = generator_from_args(args)
        max_groups = args.max_groups or gen.config.data.max_groups
        if args.cfg_scales:
            return _eval_shapes_at_scales(args, gen, max_groups)
        report = sample_shapes_eval(gen, max_groups, args.per_prompt, args.seed,
                                    steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale)
    print(report.table())
    summary = report.summary()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"ShapesEval overall: {summary['overall']:.3f} ({summary['n_images']} images, "
          f"{summary['n_prompts']} prompts)")
    return 0


def scores_at_scales(generator, scales, max_groups: int = 1, images_per_prompt: int = 4, seed: int = 0,
                     **sample_kw) -> dict[str, float]:
    """ShapesEval of one checkpoint at each guidance scale: ``{"<name>@cfg<s>": score}`` for every
    summary entry (the names training logs under ``shapes_eval/``)."""
    from trainer.config import at_cfg_scale
    out = {}
    for scale in scales:
        report = sample_shapes_eval(generator, max_groups, images_per_prompt, seed, cfg_scale=scale, **sample_kw)
        out.update({at_cfg_scale(k, scale): float(v) for k, v in report.summary().items()})
    return out


def _eval_shapes_at_scales(args: argparse.Namespace, gen, max_groups: int) -> int:
    from trainer.config import at_cfg_scale
    from trainer.eval.shapes_eval import TASKS
    if any(s < 0 for s in args.cfg_scales):
        raise SystemExit(f"crossflow eval shapes: --cfg-scales must be >= 0 (1 = no guidance), got {args.cfg_scales}")
    scores = scores_at_scales(gen, args.cfg_scales, max_groups, args.per_prompt, args.seed,
                              steps=args.steps, solver=args.solver)
    names = ("overall", "overall_heldout") + TASKS
    print(f"{'cfg scale':>9} " + " ".join(f"{n:>15}" for n in names))
    for scale in args.cfg_scales:
        print(f"{scale:>9g} " + " ".join(f"{scores[at_cfg_scale(n, scale)]:>15.3f}" for n in names))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    from trainer.eval.fid_clip import _require_path, fid_score
    _require_path(args.inception, "Inception weights", "pass --inception PATH")  # fail before sampling
    images, _, gen = _generate(args, _read_prompts(args.prompts, 1))
    resolution = images[0].shape[0]
    if args.reference == "shapes":
        from data_pipeline.shapes import ShapesGenerator
        d = gen.config.data
        shapes = ShapesGenerator(resolution, d.max_groups, "all", seed=12345)
        reference = [shapes.sample(i)["image"] for i in range(max(len(images), 2))]
    else:
        reference = load_image_dir(args.reference, resolution)
    score = fid_score(images, reference, args.inception, feature_dim=args.feature_dim, device=args.device)
    print(f"FID ({len(images)} generated vs {len(reference)} reference, {args.feature_dim}-d features): {score:.3f}")
    return 0


def _eval_clip(args: argparse.Namespace) -> int:
    from trainer.eval.fid_clip import clip_score, load_clip
    load_clip(args.clip)  # fail on a missing model before sampling
    images, prompts, _ = _generate(args, _read_prompts(args.prompts, 1))
    score = clip_score(images, prompts, args.clip, device=args.device)
    print(f"CLIP score ({len(images)} image-prompt pairs): {score:.4f}")
    return 0


def _eval_task(args: argparse.Namespace) -> int:
    """``crossflow eval superres|depth|caption``: the task's metric vs its baseline on unseen scenes."""
    from trainer.task_inference import TASK_COMMANDS, evaluate_task
    if args.num is not None and args.num <= 0:
        raise SystemExit(f"crossflow eval {args.eval_command}: --num must be positive, got {args.num}")
    predictor = task_predictor_from_args(args, TASK_COMMANDS[args.eval_command], f"crossflow eval {args.eval_command}")
    images = None
    if getattr(args, "images", None):
        images = load_image_dir(args.images, predictor.config.data.resolution)[:args.num]
    result = evaluate_task(predictor, args.num, args.seed, images=images, images_from=getattr(args, "images", ""),
                           split=args.split, steps=args.steps, solver=args.solver, cfg_scale=args.cfg_scale)
    print(result.table())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint), "seed": args.seed,
                                              **result.to_dict()}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


_TASK_HELP = {
    "superres": ("super-resolution: PSNR, SSIM vs bicubic upsampling, and ShapesEval of the outputs",
                 "Area-downsample unseen shapes scenes (--split) to the checkpoint's task.source_resolution, upsample them "
                 "with the model, and compare PSNR and SSIM with bicubic upsampling's; ShapesEval scores the "
                 "outputs against the true scenes (--images DIR: your own images instead, PSNR and SSIM only). "
                 "The upsampled input is z0: --seed and --z0 change nothing."),
    "depth": ("depth: AbsRel and delta < 1.25 vs the mean depth map",
              "Predict metric depth for unseen shapes scenes (--split) and compare AbsRel and delta1 (the fraction of "
              "pixels within a factor 1.25) with the training scenes' mean depth map."),
    "caption": ("captioning: attributes read back from the caption, BLEU-4, vs the most frequent caption",
                "Caption unseen shapes scenes (--split), parse each caption back into a scene and compare it with the "
                "true one (object, count, color, position, size, overall; parsed = the fraction that parse), "
                "BLEU-4 against every template phrasing; baseline: the most frequent training caption."),
}


def _task_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    add_flow_args(p, seed_help="seed of z0 = mu + sigma * eps (the first batch; later batches continue its stream)")
    p.add_argument("--num", type=int, default=None,
                   help="shapes scenes to score (default: as many as training's end-of-run evaluation: "
                        "eval.images_per_prompt x the ShapesEval prompt count)")
    p.add_argument("--split", choices=("unseen", "heldout"), default="unseen",
                   help="unseen: scenes of the training distribution that training never saw (the default, what "
                        "training's end-of-run evaluation scores); heldout: scenes with a color-shape pair the "
                        "training split never has (composition)")
    p.add_argument("--out", help="also write model and baseline scores to this JSON file")
    p.set_defaults(func=_eval_task)


def _sampling_args(p: argparse.ArgumentParser, checkpoint_required: bool) -> None:
    add_sampling_args(p, checkpoint_required, seed_help="seed of the first image of each prompt")
    p.add_argument("--per-prompt", type=int, default=4, help="images per prompt (seeds seed, seed+1, ...)")


def add_eval_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval shapes|fid|clip|superres|depth|caption`` on the main parser's subparsers; returns
    the ``eval`` parser.
    Each leaf sets ``func`` to a function(args) -> exit code, like the other commands."""
    ev = subparsers.add_parser("eval", help="score a checkpoint: ShapesEval, FID, CLIP score; a task's metric vs "
                                            "its baseline",
                               description="Evaluate a trained checkpoint. Weights for FID and CLIP come "
                                           "from local paths only; nothing is downloaded.")
    sub = ev.add_subparsers(dest="eval_command", required=True, metavar="METRIC")

    p = sub.add_parser("shapes", help="ShapesEval: object/count/color/position/size on the shapes domain (CPU)",
                       description="Sample the fixed ShapesEval prompt suite and score every image with the "
                                   "deterministic pixel analyzer; print the per-prompt table and the overall score.")
    _sampling_args(p, checkpoint_required=False)
    p.add_argument("--max-groups", type=int, choices=(1, 2), default=None,
                   help="suite: 1 = single-group prompts, 2 = also two-group prompts (default: the checkpoint's)")
    p.add_argument("--json", help="also write the summary (per-task scores) to this JSON file")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=None, metavar="S",
                   help="score the checkpoint at each of these guidance scales (1 = no guidance) instead of "
                        "--cfg-scale: one row per scale; --json keys <task>@cfg<s>, as training's eval.cfg_scales")
    p.add_argument("--self-check", action="store_true",
                   help="score the generator's own renderings instead of a checkpoint (the analyzer's ceiling)")
    p.add_argument("--resolution", type=int, default=32, help="image side for --self-check")
    p.set_defaults(func=_eval_shapes)

    p = sub.add_parser("fid", help="FID against reference images, Inception weights from a local file",
                       description="FID of a checkpoint's samples against reference images.")
    _sampling_args(p, checkpoint_required=True)
    p.add_argument("--inception", required=True,
                   help="torch-fidelity InceptionV3 weights (weights-inception-2015-12-05-6726825d.pth)")
    p.add_argument("--reference", required=True,
                   help="directory of reference images, or 'shapes' for the shapes generator's renderings")
    p.add_argument("--prompts", help="text file, one prompt per line (default: the ShapesEval captions)")
    p.add_argument("--feature-dim", type=int, choices=(64, 192, 768, 2048), default=2048,
                   help="Inception feature layer (2048 = standard FID)")
    p.set_defaults(func=_eval_fid)

    p = sub.add_parser("clip", help="CLIP score of samples vs their prompts, CLIP from a local directory",
                       description="Mean clipped cosine similarity between each sample and its prompt.")
    _sampling_args(p, checkpoint_required=True)
    p.add_argument("--clip", required=True, help="local Hugging Face CLIP directory (model + processor)")
    p.add_argument("--prompts", help="text file, one prompt per line (default: the ShapesEval captions)")
    p.set_defaults(func=_eval_clip)

    for command, (short, long) in _TASK_HELP.items():
        p = sub.add_parser(command, help=short, description=long + " A checkpoint of another task is refused.")
        _task_eval_args(p)
        if command == "superres":
            p.add_argument("--images", default=None, metavar="DIR",
                           help="score the images in DIR (resized to the checkpoint's data.resolution; the first --num) "
                                "instead of shapes scenes: e.g. real photos for a latent-space model")
            p.add_argument("--vae", default=None,
                           help="local diffusers AutoencoderKL folder of a latent-space model (default: the one the "
                                "checkpoint's metadata names)")
    return ev
