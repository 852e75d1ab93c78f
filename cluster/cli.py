"""``crossflow submit`` and ``crossflow jobs status|logs|stop``: parse, dispatch to cluster.jobs.
Ray is imported only when one of them runs."""
from __future__ import annotations

import argparse
import os
import sys

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
    from trainer.cli import OVERRIDES_HELP
    addr_help = f"Ray dashboard address (default: RAY_ADDRESS, else {DEFAULT_ADDRESS})"

    p = subparsers.add_parser("submit", help="submit training to a Ray cluster as a Ray Job",
                              description="Submit `crossflow train --config CONFIG [overrides]` as a Ray Job "
                                          "that runs the shipped code (`python -m trainer.cli train`). "
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
