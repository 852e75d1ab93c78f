"""Host time per optimizer step, everything but the model's forward and backward, as the cluster grows.

    python bench/host_overhead.py                                  # global batches 64, 256, 1024, 4096
    python bench/host_overhead.py --global-batches 64,128 --micro-batch 8 --latent 4,8,8 --steps 2   # smoke

What one rank does per optimizer step (grad_accum 1) with a fixed micro-batch (``--micro-batch``,
32) while the world size grows (world = global batch / micro-batch, simulated in one process:
rank 0's share of the work), on the CPU with fake data of the paper's shapes (latent 4x32x32,
77 text tokens of width 768):

* data: the next batch of a prepared list, moved to the device as ``trainer.loop`` does;
* noise: ``draw_noise`` for rank 0's rows (t, CFG indicator, eps, the partner map);
* target swap: rank 0's share of the unconditional-target swap without the network: today, the
  rows it sends to other ranks gathered plus its targets indexed from cat(z1, received);
  before, the all-gather's output (world x micro-batch latents) concatenated and indexed;
* bookkeeping and logging: ``StepStats.add`` every step, ``StepStats.reduce`` and a
  ``MetricsLogger`` record every ``--log-every`` steps.

"new" is this checkout; "old" is ``draw_noise`` and the all-gather swap of ``--old-ref`` (a git
commit: the module is read with ``git show`` and imported as a temporary module), the commit before
the counter-based noise. Per global batch: the median over ``--steps`` steps, in ms, of the best of
``--rounds`` rounds (settings interleaved: on a shared machine a burst of load then spoils a round,
not a setting).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD_REF = "7b62cc9"  # the last commit with one torch.Generator per sample and the all-gather swap
PHASES = ("data", "noise", "swap", "bookkeeping")


def load_old_objectives(ref: str):
    """trainer/objectives.py as of ``ref``, imported as a module of its own."""
    source = subprocess.run(["git", "show", f"{ref}:trainer/objectives.py"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "objectives_old.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("objectives_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_batches(n: int, micro: int, latent, tokens: int, width: int) -> list[dict]:
    return [{"latent": torch.randn(micro, *latent), "text_emb": torch.randn(micro, tokens, width),
             "text_mask": torch.ones(micro, tokens, dtype=torch.long)} for _ in range(n)]


def new_swap(z1: torch.Tensor, noise) -> torch.Tensor:
    """Rank 0's host share of ``swapped_targets``: the rows it sends, and its targets from cat(z1,
    received) (the received rows stand in as the sent ones: the same count on average)."""
    sent = z1[noise.swap.send_rows]  # (n_send, C, H, W)
    received = z1.new_empty((sum(noise.swap.recv_counts), *z1.shape[1:]))
    received[: min(len(sent), len(received))] = sent[: len(received)]
    return torch.cat([z1, received])[noise.swap.index]


def old_swap(z1: torch.Tensor, noise, world: int) -> torch.Tensor:
    """The old ``_gather_batch``'s result without the network: world copies of the micro-batch."""
    gathered = torch.cat([z1] * world)  # (W*b, C, H, W)
    return gathered[noise.target_source]


def measure(draw, swap, world: int, args, log_dir: Path) -> dict[str, float]:
    """Median ms per phase over ``args.steps`` optimizer steps of rank 0."""
    from trainer.config import LogConfig, ObjectiveConfig
    from trainer.loop import StepStats
    from trainer.metrics import MetricsLogger

    cfg, device = ObjectiveConfig(), torch.device("cpu")
    batches = fake_batches(min(args.steps, 4), args.micro_batch, args.latent, args.tokens, args.width)
    metrics = MetricsLogger(log_dir, LogConfig(wandb="disabled", progress=False), {}, args.steps)
    stats, times = StepStats(), {p: [] for p in PHASES}
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = batches[step % len(batches)]
        z1 = batch["latent"].to(device, non_blocking=True)  # (b, C, H, W)
        batch["text_emb"].to(device, non_blocking=True), batch["text_mask"].to(device, non_blocking=True)
        t1 = time.perf_counter()
        noise = draw(cfg, 0, step, 0, args.micro_batch, 0, world, args.latent, device)
        t2 = time.perf_counter()
        target = swap(z1, noise)  # (b, C, H, W)
        t3 = time.perf_counter()
        loss = (target.mean() + noise.eps.mean()).detach()  # stands in for the losses the step returns
        stats.add({"total": loss, "flow_matching": loss, "kl": loss, "contrastive": loss}, loss)
        if (step + 1) % args.log_every == 0:
            metrics.log({"step": step + 1, **stats.reduce(device)})
            stats = StepStats()
        t4 = time.perf_counter()
        if step >= args.warmup:
            for phase, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[phase].append(dt * 1e3)
    metrics.close()
    out = {p: statistics.median(v) for p, v in times.items()}
    out["total"] = statistics.median([sum(v) for v in zip(*times.values())])
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--global-batches", default="64,256,1024,4096", help="comma-separated global batch sizes")
    p.add_argument("--micro-batch", type=int, default=32, help="per-rank micro-batch (world = global / this)")
    p.add_argument("--latent", default="4,32,32", help="latent shape C,H,W")
    p.add_argument("--tokens", type=int, default=77, help="text tokens")
    p.add_argument("--width", type=int, default=768, help="text embedding width")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps per setting")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds over all settings; per setting, the round with the least total counts")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics records (train.log_every)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one rank's host thread); 0 = as is")
    p.add_argument("--old-ref", default=OLD_REF, help="git commit of the old draw_noise and swap; '' skips it")
    args = p.parse_args(argv)
    args.latent = tuple(int(v) for v in args.latent.split(","))
    args.global_batches = [int(v) for v in args.global_batches.split(",")]
    for g in args.global_batches:
        if g % args.micro_batch:
            p.error(f"global batch {g} is not a multiple of --micro-batch {args.micro_batch}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from trainer.objectives import draw_noise
    old = load_old_objectives(args.old_ref) if args.old_ref else None
    runs: dict[tuple[int, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # settings interleaved, so a burst of load hits one round, not one setting
            for g in args.global_batches:
                world = g // args.micro_batch
                new = measure(draw_noise, new_swap, world, args, Path(tmp) / f"new{r}_{g}")
                runs.setdefault((g, "new"), []).append(new)
                if old:
                    was = measure(old.draw_noise, lambda z1, n, w=world: old_swap(z1, n, w), world, args,
                                  Path(tmp) / f"old{r}_{g}")
                    runs.setdefault((g, "old"), []).append(was)
    best = {key: min(results, key=lambda m: m["total"]) for key, results in runs.items()}
    rows = [(g, g // args.micro_batch, best[g, "new"], best.get((g, "old"))) for g in args.global_batches]
    print(f"host ms per optimizer step (median of {args.steps} steps, best of {args.rounds} rounds), micro-batch "
          f"{args.micro_batch} per rank, latent {'x'.join(map(str, args.latent))}, {args.threads} thread(s); "
          f"old = {args.old_ref or '-'}")
    print("| global batch | world | new: data / noise / swap / bookkeeping | new total | old: noise / swap | "
          "old total |")
    print("|---|---|---|---|---|---|")
    for g, world, new, was in rows:
        old_cols = (f"{was['noise']:.2f} / {was['swap']:.2f} | {was['total']:.2f}" if was else "- | -")
        print(f"| {g} | {world} | {new['data']:.2f} / {new['noise']:.2f} / {new['swap']:.2f} / "
              f"{new['bookkeeping']:.2f} | {new['total']:.2f} | {old_cols} |")


if __name__ == "__main__":
    main()
