"""``crossflow data convert`` and ``crossflow data features`` (registered by trainer.cli through
:func:`add_data_commands`)."""
from __future__ import annotations

import argparse
import sys

from data_pipeline.sources import SOURCE_KINDS

FEATURE_HELP = """Features are stored in 16 bits: text token embeddings (n, d) with a bool mask, image latents
(C, h, w) as the autoencoder's scaled posterior mean. They run batched, on a GPU when one is present."""


def _add_feature_args(p: argparse.ArgumentParser, text_default: str | None) -> None:
    p.add_argument("--text-encoder", default=text_default,
                   help="minilm (the packaged all-MiniLM-L6-v2), hashed-words (tests), or a local transformers model "
                        f"directory; 'none' stores no text features (default: {text_default or 'none'})")
    p.add_argument("--max-tokens", type=int, default=77,
                   help="text tokens per caption, padded or truncated (must equal the trainer's data.max_tokens)")
    p.add_argument("--vae", default=None,
                   help="local directory of a diffusers AutoencoderKL: store image latents (never downloaded)")
    p.add_argument("--latent-resolution", type=int, default=None,
                   help="center-crop and resize images to this side before the autoencoder (default: as stored)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per feature batch")


def _add_shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard-size", default="64MB", help="target shard size in bytes (64MB, 512KB, 1GB...)")
    p.add_argument("--compression", default=None, help="MDS shard compression (e.g. zstd); none by default")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _featurizer(args):
    from data_pipeline.convert import Featurizer
    text = None
    if args.text_encoder and args.text_encoder != "none":
        from data_pipeline.features import default_device, load_text_encoder
        text = load_text_encoder(args.text_encoder, args.device or default_device())
    image = None
    if args.vae:
        from data_pipeline.features import load_image_encoder
        image = load_image_encoder(args.vae, args.device)
    if text is None and image is None:
        return None
    return Featurizer(text, args.max_tokens, image, args.latent_resolution)


def _convert(args) -> int:
    from data_pipeline.convert import convert, parse_size
    from data_pipeline.sources import open_source
    items = open_source(args.source, args.input, num_samples=args.num_samples, resolution=args.resolution,
                        max_groups=args.max_groups, split=args.split, seed=args.seed,
                        image_column=args.image_column, caption_column=args.caption_column)
    summary = convert(items, args.format, args.out, shard_bytes=parse_size(args.shard_size),
                      compression=args.compression, featurizer=_featurizer(args), batch_size=args.batch_size,
                      on_error=args.on_error, total=args.num_samples if args.source == "shapes" else None,
                      progress=not args.no_progress)
    print(summary.text(args.out))
    return 0


def _features(args) -> int:
    from data_pipeline.convert import add_features, parse_size
    featurizer = _featurizer(args)
    if featurizer is None:
        print("crossflow data features: nothing to compute: give --text-encoder and/or --vae", file=sys.stderr)
        return 2
    summary = add_features(args.inp, args.out, fmt=args.format, featurizer=featurizer, batch_size=args.batch_size,
                           shard_bytes=parse_size(args.shard_size), compression=args.compression,
                           cache_dir=args.cache_dir, progress=not args.no_progress)
    print(summary.text(args.out))
    return 0


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
                       description="Read every sample of existing MDS or WebDataset shards (local or s3://), compute "
                                   "text embeddings and/or image latents once, and write new shards. " + FEATURE_HELP)
    p.add_argument("--in", dest="inp", required=True, help="existing shards: folder or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="new or empty folder, or s3://bucket/prefix")
    p.add_argument("--format", default=None, choices=("mds", "wds"), help="output format (default: the input's)")
    p.add_argument("--cache-dir", default=None, help="local cache for remote input shards (MDS from s3:// needs one)")
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
