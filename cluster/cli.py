"""The ``crossflow`` entry point (setup.cfg's console script; ``python -m cluster.cli``): one parser
registers every command group: ``train`` (here: on Ray Train, under torchrun or in this process), the
trainer's (trainer.cli), the data pipeline's (data_pipeline.cli), ``sweep run``, ``submit`` and
``jobs status|logs|stop`` (here). It sits on top so imports flow one way (kernels <- trainer <-
cluster); Ray is imported only when a command needs it."""
from __future__ import annotations

import argparse
import os
import sys

from trainer.cli import OVERRIDES_HELP, add_trainer_commands, print_summary

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _address(args) -> str:
    return args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _unreachable(command: str, address: str, error: Exception) -> int:
    print(f"crossflow {command}: no Ray dashboard answers at {address} ({str(error).splitlines()[0]}); start "
          f"one with `ray start --head`, or give its address with --address or RAY_ADDRESS", file=sys.stderr)
    return 2


def _submit(args: argparse.Namespace) -> int:
    from cluster.jobs import follow_logs, submit_job
    address = _address(args)
    try:
        job_id = submit_job(address, args.config, args.overrides, args.working_dir, python=args.python)
    except ConnectionError as e:
        return _unreachable("submit", address, e)
    print(f"submitted {job_id} to {address}")
    print(f"follow:  crossflow jobs logs {job_id} --follow --address {address}")
    print(f"status:  crossflow jobs status {job_id} --address {address}")
    print(f"stop:    crossflow jobs stop {job_id} --address {address}")
    if args.follow:
        status = follow_logs(address, job_id)
        print(f"{job_id}: {status}")
        return 0 if status == "SUCCEEDED" else 1
    return 0


def _jobs(args: argparse.Namespace) -> int:
    address = _address(args)
    try:
        return _jobs_command(args, address)
    except ConnectionError as e:
        return _unreachable(f"jobs {args.jobs_command}", address, e)


def _jobs_command(args: argparse.Namespace, address: str) -> int:
    from cluster import jobs
    if args.jobs_command == "status":
        print(jobs.job_status(address, args.job_id))
    elif args.jobs_command == "logs":
        if args.follow:
            print(f"{args.job_id}: {jobs.follow_logs(address, args.job_id)}")
        else:
            print(jobs.job_logs(address, args.job_id), end="")
    else:
        stopped = jobs.stop_job(address, args.job_id)
        print(f"{args.job_id}: {'stop requested (final checkpoint, then exit)' if stopped else 'not running'}")
    return 0


def add_cluster_commands(subparsers: argparse._SubParsersAction) -> None:
    addr_help = f"Ray dashboard address (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})"

    p = subparsers.add_parser("submit", help="submit training to a Ray cluster as a Ray Job",
                              description="Submit `crossflow train --config CONFIG [overrides]` as a Ray Job "
                                          "that runs the shipped code (`python -m cluster.cli train`). "
                                          "cluster.runtime_env says what the job's runtime_env ships: "
                                          "working_dir (the working directory minus .git, .venv, runs/, "
                                          "wandb/, caches, shards, files over cluster.max_file_mb), pip (that "
                                          "and cluster.requirements or setup.cfg's install_requires), image "
                                          "(cluster.image) or none. Prints the job id.")
    p.add_argument("--address", default=None, help=addr_help)
    p.add_argument("--config", default="configs/demo.yaml", help="YAML config inside the working directory")
    p.add_argument("--working-dir", default=".", help="the repository shipped to the cluster; --config must lie inside it (default: .)")
    p.add_argument("--python", default="python", help="the Python that runs the job on the cluster (default: python, the one "
                                                            "Ray's runtime_env puts first on PATH)")
    p.add_argument("--follow", action="store_true", help="print the job's log until it ends")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_submit)

    p = subparsers.add_parser("jobs", help="status, logs or stop of a submitted job",
                              description="Wrap the Ray Jobs API for jobs made by `crossflow submit`.")
    sub = p.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    for name, help in (("status", "PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED"),
                       ("logs", "the job's driver log (--follow: until it ends)"),
                       ("stop", "SIGTERM to the driver: workers write a final checkpoint and exit")):
        q = sub.add_parser(name, help=help, description=help)
        q.add_argument("job_id", help="the id `crossflow submit` printed")
        q.add_argument("--address", default=None, help=addr_help)
        if name == "logs":
            q.add_argument("--follow", action="store_true", help="stream until the job ends")
        q.set_defaults(func=_jobs)


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this command as ``nproc`` processes on this node under torchrun (gloo on CPU, nccl on GPU)."""
    import subprocess
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cluster.cli", *argv]
    return subprocess.call(cmd)


def _train(args: argparse.Namespace) -> int:
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
    if int(os.environ.get("RANK", 0)) == 0:
        print_summary(summary)
    return 0


def add_train_command(sub: argparse._SubParsersAction) -> None:
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



def _sweep_run(args: argparse.Namespace) -> int:
    from cluster.sweep import RESULTS_FILE, format_results, run_sweep
    from trainer.sweep_spec import load_sweep
    spec = load_sweep(args.config)
    rows = run_sweep(spec, args.retry_failed, args.address or os.environ.get("RAY_ADDRESS", ""))
    print(format_results(rows))
    print(f"results: {os.path.join(spec.out_dir, RESULTS_FILE)}")
    if any(r["status"] == "unfinished" for r in rows):
        print(f"interrupted: run `crossflow sweep run --config {args.config}` again to resume")
    print(f"analyze with: crossflow sweep analyze {spec.out_dir}")
    return 0 if all(r["status"] == "finished" for r in rows) else 1


def add_sweep_run_command(sweep_sub: argparse._SubParsersAction) -> None:
    """``crossflow sweep run`` on the ``sweep`` parser of ``trainer.sweep_cli`` (cluster/sweep.py)."""
    p = sweep_sub.add_parser(
        "run", help="run a sweep's points as Ray Tune trials, each a distributed Ray Train run",
        description="Run every point of a sweep file (grid and isoFLOP points, trainer/sweep_spec.py) as a Ray "
                    "Tune trial that starts the point's Ray Train run (its workers, DeepSpeed ZeRO, its "
                    "checkpoints), as many at once as the sweep's max_concurrent and the cluster allow. Running "
                    "the same command again resumes the sweep: finished points are not run again, unfinished "
                    "ones resume from their checkpoints. Writes <out_dir>/results.csv (see cluster/sweep.py).")
    p.add_argument("--config", required=True, help="sweep file (configs/sweeps/<name>.yaml)")
    p.add_argument("--address", default="", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded "
                                                 "cluster sized for the sweep)")
    p.add_argument("--retry-failed", action="store_true",
                   help="when resuming, run again the points that failed (by default they stay failed)")
    p.set_defaults(func=_sweep_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossflow", description=(
        "Train and sample CrossFlow: text-to-image flow matching from the text's latent, "
        "no noise source and no cross-attention (arXiv 2412.15213)."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_command(sub)  # `crossflow train`
    sweep_sub = add_trainer_commands(sub)  # sample, interpolate, arithmetic, export, config, plan, eval, sweep analyze
    from data_pipeline.cli import add_data_commands  # `crossflow data convert|features`
    add_data_commands(sub)
    add_sweep_run_command(sweep_sub)  # `crossflow sweep run` (Ray imported when it runs)
    add_cluster_commands(sub)  # `crossflow submit`, `crossflow jobs ...` (Ray imported lazily)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] != "--help":
        argv.insert(1, "run")  # `crossflow sweep --config X` is `crossflow sweep run --config X`
    args = build_parser().parse_args(argv)
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"crossflow: config error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"crossflow: checkpoint error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
