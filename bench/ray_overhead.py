"""Ray Train vs torchrun: the same 2-worker DeepSpeed run (same config, same steps), launched both ways.

Per-step time after start-up comes from metrics.jsonl's timestamps between the second logging
step and the last (the first interval holds warm-up); start-up is the launch-to-first-step time
(wall time to the first log record minus the steps it covers at the steady rate).

    python bench/ray_overhead.py --steps 200 [--append bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

REPO = Path(__file__).resolve().parents[1]


def overrides(out_dir: Path, steps: int, log_every: int) -> list[str]:
    values = {"model.preset": "tiny", "model.kernels": "torch", "data.text_encoder": "hashed-words-32",
              "data.num_samples": 4096, "data.max_tokens": 12, "train.steps": steps, "train.global_batch_size": 16,
              "train.log_every": log_every, "train.ckpt_every": 0, "train.threads": 1, "train.zero_stage": 2,
              "train.out_dir": str(out_dir), "sample.steps": 2, "sample.num_prompts": 2, "eval.shapes": False,
              "log.wandb": "disabled", "log.progress": False, "cluster.num_workers": 2, "cluster.cpus_per_worker": 1}
    return [f"{k}={v}" for k, v in values.items()]


def timed_run(launcher: str, out_dir: Path, steps: int, log_every: int) -> dict:
    extra = ["--no-ray", "--nproc", "2"] if launcher == "torchrun" else ["--nproc", "2"]
    cmd = [sys.executable, "-m", "cluster.cli", "train", "--config", "configs/demo.yaml", *extra,
           *overrides(out_dir, steps, log_every)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    t0 = time.time()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if out.returncode:
        raise SystemExit(f"{launcher} run failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "loss" in r]
    a, b = recs[1], recs[-1]  # skip the first interval (warm-up)
    per_step = (b["time"] - a["time"]) / (b["step"] - a["step"])
    startup = recs[0]["time"] - t0 - recs[0]["step"] * per_step
    return {"launcher": launcher, "wall_s": wall, "per_step_s": per_step, "startup_s": startup,
            "final_loss": b["loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="alternate the launchers this many times")
    ap.add_argument("--append", default=None, help="append a '## Ray overhead' section to this markdown file")
    args = ap.parse_args()
    rows = []
    with TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for launcher in ("torchrun", "ray"):
                r = timed_run(launcher, Path(tmp) / f"{launcher}{i}", args.steps, args.log_every)
                print(json.dumps(r), flush=True)
                rows.append(r)
    med = {}
    for launcher in ("torchrun", "ray"):
        rs = sorted(rows, key=lambda r: r["per_step_s"])
        rs = [r for r in rs if r["launcher"] == launcher]
        med[launcher] = rs[len(rs) // 2]
    ratio = med["ray"]["per_step_s"] / med["torchrun"]["per_step_s"]
    print(f"per step after start-up: ray {med['ray']['per_step_s'] * 1e3:.1f} ms, torchrun "
          f"{med['torchrun']['per_step_s'] * 1e3:.1f} ms, ratio {ratio:.3f}; start-up: ray "
          f"{med['ray']['startup_s']:.1f} s, torchrun {med['torchrun']['startup_s']:.1f} s")
    if args.append:
        lines = [
            "", "## Ray overhead", "",
            f"`python bench/ray_overhead.py --steps {args.steps} --log-every {args.log_every} --repeats "
            f"{args.repeats}` on {platform.node() or 'this machine'} ({os.cpu_count()} CPU cores, no GPU, shared "
            "with other jobs): tiny preset, hashed-words-32 text, global batch 16, ZeRO-2, 2 CPU workers on gloo, "
            "no checkpoints or eval during the run; the same config launched by torchrun (`--no-ray --nproc 2`) "
            "and by Ray Train's TorchTrainer on an embedded cluster (`--nproc 2`). Per-step time is measured "
            "between the second and the last logging step (median of the repeats); start-up is launch to the "
            "first step.", "",
            "| launcher | per step (ms) | start-up (s) | wall (s) | final loss |", "|---|---|---|---|---|",
            *(f"| {r['launcher']} | {r['per_step_s'] * 1e3:.1f} | {r['startup_s']:.1f} | {r['wall_s']:.1f} | "
              f"{r['final_loss']:.4f} |" for r in rows),
            "", f"Ray / torchrun per-step ratio: **{ratio:.3f}** (aim: within 1.15).", ""]
        with open(args.append, "a") as f:
            f.write("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
