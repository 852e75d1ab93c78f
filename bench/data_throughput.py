"""Data-loader throughput: samples/s from local MDS, local WebDataset and a local S3 endpoint
(a Ceph RGW started here on 127.0.0.1), with 0, 2 and 4 DataLoader workers, for two records:

* ``shapes``: the synthetic 32x32 PNG + caption + 16x384 float16 text embedding (MiniLM's, the demo's),
  decoded to the trainer's batch (image float32 in [-1, 1], text_emb float32, mask, caption);
* ``latent256``: a 256px image's latent, 4x32x32 float16, + a 77x768 float16 text embedding
  (CLIP-L-sized), no pixels.

Each cell is one full shuffled epoch through ``build_shard_loader`` (batch 32, drop_last off);
S3 cells start from an empty cache, so they include the download. Loader construction (index
read) is timed apart. Usage::

    python bench/data_throughput.py                      # everything, prints a markdown table
    python bench/data_throughput.py --no-s3 --workers 0 2
    python bench/data_throughput.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.features import CaptionCache, load_text_encoder  # noqa: E402
from data_pipeline.readers import build_shard_loader  # noqa: E402
from data_pipeline.sources import shapes_source  # noqa: E402
from data_pipeline.writers import open_writer  # noqa: E402
from tests.support.rgw import LocalRGW, rgw_unavailable_reason  # noqa: E402


def shapes_records(n: int):
    captions = CaptionCache(load_text_encoder("minilm"), 16)  # each distinct caption embedded once
    for s in shapes_source(n, resolution=32):
        emb, mask = captions.lookup(s.caption)  # (16, 384) float16, (16,)
        yield {"key": s.key, "caption": s.caption, "image": s.image, "image_ext": "png", "meta": s.meta,
               "text_emb": emb, "text_mask": mask}


def latent_records(n: int):
    rng = np.random.default_rng(0)
    for i in range(n):
        mask = np.zeros(77, bool)
        mask[: rng.integers(5, 77)] = True
        yield {"key": f"{i:09d}", "caption": f"sample {i}", "image": b"", "image_ext": "", "meta": {},
               "latent": rng.standard_normal((4, 32, 32)).astype(np.float16),
               "text_emb": rng.standard_normal((77, 768)).astype(np.float16), "text_mask": mask}


RECORDS = {"shapes": shapes_records, "latent256": latent_records}


def write(fmt: str, out: str, records) -> tuple[int, int]:
    w = open_writer(fmt, out, shard_bytes=16 << 20)
    for r in records:
        w.write(r)
    s = w.close()
    return s.samples, s.bytes


def measure(path: str, fmt: str, workers: int, batch: int, cache_root: str | None) -> dict:
    cache = tempfile.mkdtemp(dir=cache_root) if cache_root else None
    try:
        t0 = time.perf_counter()
        loader = build_shard_loader(path, fmt, batch, num_workers=workers, shuffle=True, seed=0, drop_last=False,
                                    cache_dir=cache)
        t1 = time.perf_counter()
        n = 0
        for b in loader:
            n += len(b["caption"])
        t2 = time.perf_counter()
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return {"samples": n, "seconds": t2 - t1, "samples_per_s": n / (t2 - t1), "setup_s": t1 - t0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes-samples", type=int, default=4000, help="samples of the shapes dataset")
    p.add_argument("--latent-samples", type=int, default=2000, help="samples of the latent256 dataset")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4], help="DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-s3", action="store_true", help="skip the S3 (RGW) cells")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    root = Path(tempfile.mkdtemp(prefix="crossflow-bench-data-"))
    rgw = None
    results = []
    try:
        locations = {"local": str(root)}
        if not args.no_s3:
            reason = rgw_unavailable_reason()
            if reason:
                print(f"S3 cells skipped: {reason}", file=sys.stderr)
            else:
                rgw = LocalRGW(memstore_bytes=4 << 30).start()
                os.environ.update(rgw.env)
                locations["s3"] = rgw.create_bucket("bench-data")
        sizes = {"shapes": args.shapes_samples, "latent256": args.latent_samples}
        for rec_name, make in RECORDS.items():
            for fmt in ("mds", "wds"):
                for where, base in locations.items():
                    path = f"{base}/{rec_name}-{fmt}"
                    n, nbytes = write(fmt, path, make(sizes[rec_name]))
                    for w in args.workers:
                        r = measure(path, fmt, w, args.batch_size, str(root) if where == "s3" else None)
                        r.update(record=rec_name, format=fmt, where=where, workers=w, bytes_per_sample=nbytes / n)
                        assert r["samples"] == n, f"{rec_name}/{fmt}/{where}: read {r['samples']} of {n}"
                        results.append(r)
                        print(f"{rec_name:9s} {fmt} {where:5s} workers={w}: {r['samples_per_s']:8.0f} samples/s "
                              f"({r['samples']} in {r['seconds']:.2f} s, setup {r['setup_s']:.2f} s)", file=sys.stderr)
    finally:
        if rgw is not None:
            rgw.stop()
        shutil.rmtree(root, ignore_errors=True)

    print(f"\nMachine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; batch "
          f"{args.batch_size}, one shuffled epoch per cell; S3 = Ceph RGW on 127.0.0.1, cold cache.\n")
    print("| record | bytes/sample | format | source | " + " | ".join(f"{w} workers" for w in args.workers) + " |")
    print("|---|---|---|---|" + "---|" * len(args.workers))
    keys = sorted({(r["record"], r["format"], r["where"]) for r in results},
                  key=lambda k: (list(RECORDS).index(k[0]), k[1], k[2]))
    for k in keys:
        row = {r["workers"]: r for r in results if (r["record"], r["format"], r["where"]) == k}
        bps = next(iter(row.values()))["bytes_per_sample"]
        print(f"| {k[0]} | {bps / 1024:.1f} KiB | {k[1]} | {k[2]} | "
              + " | ".join(f"{row[w]['samples_per_s']:.0f}" for w in args.workers) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
