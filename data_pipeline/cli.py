"""``crossflow data convert`` and ``crossflow data features`` (registered by cluster.cli through
:func:`add_data_commands`)."""
from __future__ import annotations

import argparse
import sys

from data_pipeline.metadata import DEFAULT_MAX_TOKENS
from data_pipeline.sources import SOURCE_KINDS

FEATURE_HELP = """Features are stored in 16 bits: text token embeddings (n, d) with a bool mask, image
latents (C, h, w) as the autoencoder's scaled posterior mean z = (mean - shift) * scale. They run
batched, on a GPU when one is present. crossflow_features.json beside the shards records how they
were made (encoder folders, hidden layer, multiplier, scaling and shift, resolution, latent shape,
the stored latents' measured std and mean); training and sampling read it."""


def _scaling(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the scaling factor must be positive, got {value}")
    return value


def _add_feature_args(p: argparse.ArgumentParser, text_default: str | None) -> None:
    p.add_argument("--text-encoder", default=text_default,
                   help="minilm (the packaged all-MiniLM-L6-v2), hashed-words (tests), or a local transformers model "
                        "directory: a CLIP or CLIP-text folder (its text tower), a T5 or T5-encoder folder (its "
                        f"encoder), any encoder-only model; 'none' stores no text features (default: {text_default or 'none'})")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="text tokens per caption, padded or truncated (default %(default)s, the trainer's "
                        "data.max_tokens default; the two must be equal)")
    p.add_argument("--text-hidden-layer", type=int, default=-1,
                   help="text encoder layer stored: -1 the last (after the final norm), -2 the penultimate... "
                        "(training's data.text_hidden_layer must match)")
    p.add_argument("--text-multiplier", type=float, default=1.0,
                   help="multiply text features by this (the reimplementation's T5-XXL: 10; training's "
                        "data.text_multiplier must match)")
    p.add_argument("--vae", default=None,
                   help="local directory of a diffusers AutoencoderKL: store image latents (never downloaded)")
    p.add_argument("--latent-resolution", type=int, default=None,
                   help="center-crop and resize images to this side before the autoencoder (default: as stored)")
    p.add_argument("--scaling-factor", type=_scaling, default=None,
                   help="latent scale: a number, or 'auto' = 1 / std of the unscaled posterior means of the first "
                        "--scale-samples images (a first pass before the real one), so the stored latents have std "
                        "about 1 (default: the VAE config's scaling_factor; SD uses 0.18215)")
    p.add_argument("--shift-factor", type=float, default=None,
                   help="subtracted from the posterior mean before scaling (default: the VAE config's, else 0)")
    p.add_argument("--scale-samples", type=int, default=512,
                   help="images measured by --scaling-factor auto (default %(default)s)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda (one GPU per process or rank) or cuda:N (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per feature batch")


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", default="64MB", help="target shard size in bytes (64MB, 512KB, 1GB...)")
    p.add_argument("--compression", default=None, help="MDS shard compression (e.g. zstd); none by default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _text_spec(args) -> str | None:
    return args.text_encoder if args.text_encoder and args.text_encoder != "none" else None


def _featurizer(args, scaling_factor: float | None):
    from data_pipeline.convert import Featurizer
    text = None
    if _text_spec(args):
        from data_pipeline.features import default_device, load_text_encoder
        text = load_text_encoder(args.text_encoder, args.device or default_device(),
                                 hidden_layer=args.text_hidden_layer, multiplier=args.text_multiplier)
    image = None
    if args.vae:
        from data_pipeline.features import load_image_encoder
        image = load_image_encoder(args.vae, args.device, args.batch_size, scaling_factor, args.shift_factor)
    if text is None and image is None:
        return None
    return Featurizer(text, args.max_tokens, image, args.latent_resolution)


def _open_source(args):
    from data_pipeline.sources import open_source
    return open_source(args.source, args.input, num_samples=args.num_samples, resolution=args.resolution,
                       max_groups=args.max_groups, split=args.split, seed=args.seed,
                       image_column=args.image_column, caption_column=args.caption_column)


def _convert_scaling(args) -> float | None:
    """``--scaling-factor auto``: a first pass over the source's first --scale-samples good images."""
    if args.scaling_factor != "auto" or not args.vae:
        return args.scaling_factor if args.scaling_factor != "auto" else None
    from data_pipeline.feature_jobs import measure_latent_scale
    from data_pipeline.sources import RawSample
    images = ({"image": item.image} for item in _open_source(args) if isinstance(item, RawSample))
    measured = measure_latent_scale(images, args.vae, args.device, args.scale_samples, args.latent_resolution,
                                    args.batch_size)
    print(f"measured latent std {measured['std']:.4f} over {measured['samples']} images: "
          f"scaling factor {1 / measured['std']:.5f}")
    return 1.0 / measured["std"]


def _convert(args) -> int:
    from data_pipeline.convert import convert, parse_size
    summary = convert(_open_source(args), args.format, args.out, shard_bytes=parse_size(args.shard_size),
                      compression=args.compression, featurizer=_featurizer(args, _convert_scaling(args)),
                      batch_size=args.batch_size, on_error=args.on_error,
                      total=args.num_samples if args.source == "shapes" else None, progress=not args.no_progress)
    print(summary.text(args.out))
    return 0


def _features(args) -> int:
    from data_pipeline.convert import parse_size
    from data_pipeline.feature_jobs import FeatureSettings, run_features
    if not (_text_spec(args) or args.vae):
        print("crossflow data features: nothing to compute: give --text-encoder and/or --vae", file=sys.stderr)
        return 2
    settings = FeatureSettings(
        text_encoder=_text_spec(args), max_tokens=args.max_tokens, text_hidden_layer=args.text_hidden_layer,
        text_multiplier=args.text_multiplier, vae=args.vae, latent_resolution=args.latent_resolution,
        scaling_factor=args.scaling_factor, shift_factor=args.shift_factor, scale_samples=args.scale_samples,
        batch_size=args.batch_size, format=args.format, shard_bytes=parse_size(args.shard_size),
        compression=args.compression)
    summary = run_features(args.inp, args.out, settings, num_procs=args.num_procs, device=args.device,
                           cache_dir=args.cache_dir, progress=not args.no_progress)
    if summary is None:
        print("this rank's input shards are done; rank 0 merges the index")
    else:
        print(summary.text(args.out))
    return 0


FEATURES_DESCRIPTION = """Read every sample of existing MDS or WebDataset shards (local or s3://), compute text
embeddings and/or image latents once, and write new shards.

At dataset scale: --num-procs N worker processes (or the ranks of `torchrun --nproc-per-node N
-m cluster.cli data features ...`) each take every N-th input shard and write its features to
<out>/part-<i>/; the parts' indexes are merged into one at the end. Resumable: a part is marked
done (<out>/_features_progress/done/) only once complete, so the same command run again after a
crash or a kill keeps finished parts, redoes unfinished ones, and gives the same shards as an
uninterrupted run. A progress bar shows samples/s."""


def add_data_commands(subparsers) -> None:
    """Register ``data convert`` and ``data features`` on an argparse subparsers object."""
    data = subparsers.add_parser("data", help="convert image-text pairs to MDS / WebDataset shards, add features",
                                 description="Build streamed sharded datasets (local folders or s3://).")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    p = sub.add_parser("convert", help="convert a source of image-text pairs into shards",
                       description="Convert image-text pairs into size-bounded MDS or WebDataset shards with the "
                                   "format's index, locally or to s3://bucket/prefix (endpoint and credentials from "
                                   "S3_ENDPOINT_URL / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY). "
                                   "Sources: shapes (the synthetic generator), folder (images with <stem>.txt or "
                                   "<stem>.json captions), table (JSONL or Parquet of image path + caption), wds "
                                   "(img2dataset-layout tars). Unusable samples are skipped and counted. "
                                   + FEATURE_HELP)
    p.add_argument("--source", required=True, choices=SOURCE_KINDS, help="kind of source")
    p.add_argument("--input", default=None, help="folder, table file or tar folder/glob (not for shapes)")
    p.add_argument("--format", required=True, choices=("mds", "wds"), help="shard format")
    p.add_argument("--out", required=True, help="new or empty local folder, or s3://bucket/prefix")
    p.add_argument("--num-samples", type=int, default=1000, help="shapes: number of scenes")
    p.add_argument("--resolution", type=int, default=32, help="shapes: image side in pixels")
    p.add_argument("--max-groups", type=int, default=1, choices=(1, 2), help="shapes: groups per scene")
    p.add_argument("--split", default="train", choices=("train", "heldout", "all"), help="shapes: split")
    p.add_argument("--seed", type=int, default=0, help="shapes: generator seed")
    p.add_argument("--image-column", default="image", help="table: column holding the image path")
    p.add_argument("--caption-column", default="caption", help="table: column holding the caption")
    p.add_argument("--on-error", default="skip", choices=("skip", "raise"),
                   help="a bad sample: skip and count it (default) or stop with an error naming it")
    _add_shard_args(p)
    _add_feature_args(p, None)
    p.set_defaults(func=_convert)

    p = sub.add_parser("features", help="add precomputed text / image features to existing shards",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=FEATURES_DESCRIPTION + "\n\n" + FEATURE_HELP)
    p.add_argument("--in", dest="inp", required=True, help="existing shards: folder or s3://bucket/prefix")
    p.add_argument("--out", required=True,
                   help="new or empty folder or s3://bucket/prefix, or the --out of an unfinished run to resume it")
    p.add_argument("--format", default=None, choices=("mds", "wds"), help="output format (default: the input's)")
    p.add_argument("--num-procs", type=int, default=1,
                   help="worker processes, each taking its own input shards (one GPU each when there are GPUs; "
                        "under torchrun leave it at 1: ranks come from RANK/WORLD_SIZE)")
    p.add_argument("--cache-dir", default=None, help="local cache for remote WebDataset input shards (default: none)")
    _add_shard_args(p)
    _add_feature_args(p, "minilm")
    p.set_defaults(func=_features)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m data_pipeline.cli data convert ...``)."""
    parser = argparse.ArgumentParser(prog="crossflow")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
