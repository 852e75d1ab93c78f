"""`crossflow data features` throughput: samples/s with the tiny random-weight autoencoder of
tests/support/tiny_models.py (SD-shaped: 4 latent channels, downsampling 8, widths of 8) and the
tiny CLIP text tower, on the CPU, with 1 and 2 worker processes (``--num-procs``).

Input: shapes scenes written as WebDataset shards (``--shard-samples`` per shard) at
``--resolution`` px. Each run starts from an empty output folder and is timed end to end through
``run_features`` (plan, worker start-up and model loads, featurizing, the index merge), so the
2-process figure includes spawning two Python processes (the time to the first finished shard
shows that start-up). Workers of ``--num-procs N`` on the CPU run cores/N torch threads each.
Usage::

    python bench/features_throughput.py                          # 1024 samples at 128 px, procs 1 2
    python bench/features_throughput.py --samples 4096 --resolution 256 --procs 1 2 4
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.feature_jobs import DONE_DIR, FeatureSettings, run_features  # noqa: E402
from data_pipeline.sources import shapes_source  # noqa: E402
from data_pipeline.writers import open_writer  # noqa: E402
from tests.support.tiny_models import save_tiny_clip, save_tiny_vae  # noqa: E402


def write_input(root: Path, n: int, resolution: int, shard_samples: int) -> str:
    """Shapes scenes as WebDataset shards of about ``shard_samples`` samples."""
    items = list(shapes_source(n, resolution=resolution))
    per_sample = sum(len(s.image) + len(s.caption) + 2048 for s in items) // n
    w = open_writer("wds", str(root), shard_samples * per_sample)
    for s in items:
        w.write({"key": s.key, "caption": s.caption, "image": s.image, "image_ext": s.image_ext, "meta": s.meta})
    w.close()
    return str(root)


def first_part_seconds(out: Path, t0_wall: float) -> float:
    """Seconds from the start to the first completed input shard: start-up (plan, process spawn,
    model loads) plus one shard."""
    marks = [p.stat().st_mtime for p in (out / DONE_DIR).glob("*.json")]
    return min(marks) - t0_wall if marks else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--shard-samples", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="crossflow-bench-features-"))
    try:
        vae, clip = save_tiny_vae(root / "vae"), save_tiny_clip(root / "clip", text_only=True)
        src = write_input(root / "in", args.samples, args.resolution, args.shard_samples)
        settings = FeatureSettings(text_encoder=clip, vae=vae, batch_size=args.batch_size)
        print(f"device: {platform.node()} {platform.machine()}, {os.cpu_count()} CPU cores, no GPU used; "
              f"{args.samples} samples at {args.resolution} px, ~{args.shard_samples} per input shard, batch "
              f"{args.batch_size}, tiny VAE + tiny CLIP text (77 tokens)")
        print("| procs | torch threads per proc | wall (s) | samples/s | first shard done after (s) |\n"
              "|---|---|---|---|---|")
        default_threads = torch.get_num_threads()
        runs = [(p, default_threads if p == 1 else max(1, (os.cpu_count() or 1) // p)) for p in args.procs]
        if 1 in args.procs and default_threads > 1:
            runs.insert(args.procs.index(1) + 1, (1, 1))  # one process, one thread: the per-core baseline
        for procs, threads in runs:
            out = root / f"out-{procs}-{threads}"
            if procs == 1:
                torch.set_num_threads(threads)
            t0_wall, t0 = time.time(), time.perf_counter()
            summary = run_features(src, str(out), settings, num_procs=procs, device="cpu", progress=False)
            wall = time.perf_counter() - t0
            torch.set_num_threads(default_threads)
            assert summary is not None and summary.samples == args.samples, summary
            print(f"| {procs} | {threads} | {wall:.1f} | {args.samples / wall:.1f} | "
                  f"{first_part_seconds(out, t0_wall):.1f} |", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
