"""Ray Train around ``trainer.loop.train``: one TorchTrainer worker = one DeepSpeed rank.

``run_training(cfg)`` is what ``crossflow train`` calls by default. It joins the cluster named by
``cluster.address`` / ``RAY_ADDRESS``, or starts an embedded local one (no dashboard), builds
ScalingConfig / FailureConfig / CheckpointConfig from ``cfg.cluster`` and runs ``train_worker``
on every worker. Ray Train makes the process group (gloo on CPU, nccl on GPU) and sets RANK,
WORLD_SIZE, LOCAL_RANK; ``trainer.engine.init_distributed`` joins it.

Checkpoints: the loop writes ``<out_dir>/checkpoints/step_XXXXXXXX`` collectively; after each one,
every rank reports the files it wrote (its ZeRO shards, RNG, EMA partition; rank 0 also the
shared files) and Ray merges them into ``<storage_path>/<name>/step_XXXXXXXX``: the same flat
layout, so ``trainer.checkpoint.load_checkpoint`` reads a rank's part of it as it is.

Failures: when a worker dies, Ray restarts the group (``cluster.max_failures``); the new workers
get the last reported checkpoint from ``ray.train.get_checkpoint()`` and resume from it (weights,
optimizer, step, data position, RNG), so at most one ``train.ckpt_every`` interval is redone. Each
worker fetches only the files its rank reads (``trainer.checkpoint.resume_files``: its ZeRO shards,
RNG and EMA partition, and the shared files), not every rank's shards, into its node's
``<out_dir>/checkpoints/step_XXXXXXXX`` (hard links when the storage is a local folder). Each
launch has an id written into its checkpoints: a checkpoint of an earlier launch of the same run
name is resumed only with ``train.resume=auto``.

Several nodes: ``out_dir`` may be one shared folder or the same path on each node's own disk; then
rank 0's node holds the committed checkpoints and every other node its ranks' part, and after each
checkpoint is stored (every rank reported) each node prunes its own folder to ``train.keep_last``.

Shutdown: the first Ctrl-C / SIGTERM on the driver asks the workers to stop; they agree at the
next logging step, write a final checkpoint and return. A second signal, or
``cluster.stop_timeout_s`` later, ends the workers at once.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import posixpath
import shutil
import signal
import tempfile
import threading
import time
import uuid
from pathlib import Path

import filelock
import pyarrow.fs
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2.api.config import LoggingConfig
from ray.train.torch import TorchTrainer

from data_pipeline.s3 import is_remote, shareable_s3_env, sync_endpoint_env
from trainer.checkpoint import (atomic_write_text, barrier, checkpoint_root, file_rank, latest_checkpoint,
                                prune_node_checkpoints, resume_files, tmp_tag, written_by)
from trainer.config import Config, config_from_dict

LAUNCH_FILE = "ray_launch.json"  # in rank 0's part of every reported checkpoint
PID_DIR = "ray_workers"  # <out_dir>/ray_workers/rank{r}.pid and .checkpoint.json: pid, last checkpoint saved


# ----------------------------------------------------------------------------- configs
def storage_path(cfg: Config) -> str:
    """Where Ray persists checkpoints: ``cluster.storage_path`` or ``<out_dir>/ray`` (absolute)."""
    return cfg.cluster.storage_path or str(Path(cfg.train.out_dir).resolve() / "ray")


def run_name(cfg: Config) -> str:
    return cfg.cluster.name or Path(cfg.train.out_dir).resolve().name


def uses_s3(cfg: Config) -> bool:
    return is_remote(storage_path(cfg)) or is_remote(cfg.data.path)


def scaling_config(cfg: Config) -> ScalingConfig:
    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker}
    if c.gpus_per_worker:
        resources["GPU"] = c.gpus_per_worker
    if c.memory_per_worker_gb:
        resources["memory"] = int(c.memory_per_worker_gb * 2**30)
    return ScalingConfig(num_workers=c.num_workers, use_gpu=c.gpus_per_worker > 0,
                         resources_per_worker=resources, placement_strategy=c.placement_strategy)


def ray_run_config(cfg: Config, callbacks: list | None = None) -> RunConfig:
    threads = str(max(1, int(cfg.cluster.cpus_per_worker)))
    # workers on other nodes reach the same S3 server (credentials stay with each node)
    s3_env = shareable_s3_env() if uses_s3(cfg) else {}
    return RunConfig(
        name=run_name(cfg), storage_path=storage_path(cfg), callbacks=callbacks,
        failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_last),
        # ERROR: without a dashboard Ray Train's state-API probes warn every few seconds
        logging_config=LoggingConfig(log_level="ERROR"),
        # no print patch: with stdout wrapped (DeepSpeed, W&B) it printed every line of ours twice
        worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                                         "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **s3_env}})


# ----------------------------------------------------------------------------- worker side
def rank_files(ckpt_dir: Path, rank: int) -> list[Path]:
    """The files of a checkpoint that ``rank`` wrote (rank 0: also those no rank is named in)."""
    return [ckpt_dir / name for name in written_by((p.name for p in ckpt_dir.iterdir()), rank)]


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link of ``src`` at ``dst`` (no bytes copied), or a copy where linking fails (another
    file system, a bind mount)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stage_rank_files(ckpt_dir: Path, step: int, rank: int, staging: Path, launch_id: str) -> Path:
    """Hard links (copies across file systems) of this rank's files, in a directory to report.
    Without a shared out_dir a non-zero rank finds its files still in the temporary directory."""
    src = ckpt_dir if ckpt_dir.is_dir() else ckpt_dir.parent / tmp_tag(step)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for path in rank_files(src, rank):
        if path.is_dir():
            shutil.copytree(path, staging / path.name)
            continue
        link_or_copy(path, staging / path.name)
    if rank == 0:
        (staging / LAUNCH_FILE).write_text(json.dumps({"launch_id": launch_id, "step": step}))
    return staging


class CheckpointReporter:
    """``on_checkpoint`` for ``trainer.loop.train``: every rank reports its part to Ray Train."""

    def __init__(self, out_dir: Path, rank: int, local_rank: int, launch_id: str, keep_last: int):
        self.staging_root = out_dir / "ray_staging" / f"rank{rank}"
        self.out_dir, self.rank, self.local_rank, self.launch_id = out_dir, rank, local_rank, launch_id
        self.keep_last = keep_last

    def __call__(self, step: int, ckpt_dir: Path, last_metrics: dict) -> None:
        staging = stage_rank_files(Path(ckpt_dir), step, self.rank, self.staging_root / Path(ckpt_dir).name,
                                   self.launch_id)
        metrics = {k: v for k, v in last_metrics.items() if isinstance(v, (int, float))}
        metrics["step"] = step
        # Ray registers a report only when its controller next polls the workers (every 2 s): a
        # worker that dies before that loses it. This rank's own record of the (complete) checkpoint
        # lets a restart resume from the run's copy instead.
        atomic_write_text(launch_record(self.out_dir, self.rank),
                          json.dumps({"launch_id": self.launch_id, "checkpoint": str(Path(ckpt_dir).resolve())}))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staging)),
                         checkpoint_dir_name=Path(ckpt_dir).name)
        shutil.rmtree(staging, ignore_errors=True)
        barrier()  # every rank's part is stored (report uploads before it returns) and none is staging
        if self.local_rank == 0:
            prune_node_checkpoints(self.out_dir, self.keep_last)
        if self.rank == 0:
            print(checkpoint_line(step, ckpt_dir, last_metrics), flush=True)


def checkpoint_line(step: int, ckpt_dir: Path, last_metrics: dict) -> str:
    """What the console says of a checkpoint, once (rank 0): ``checkpoint step 500 (loss 0.8123): PATH``."""
    loss = f" (loss {last_metrics['loss']:.4f})" if "loss" in last_metrics else ""
    return f"checkpoint step {step}{loss}: {ckpt_dir}"


def quiet_ray_train_reports() -> None:
    """Ray Train logs "Reporting training result N: TrainingReport(checkpoint=..., metrics={...})" at
    INFO on every rank at every checkpoint: the whole metrics dict, twice. Its logger is named after
    the module's file, not under ``ray.train``, so ``LoggingConfig(log_level=...)`` misses it;
    ``checkpoint_line`` says what matters once instead."""
    from ray.train.v2._internal.execution import context
    context.logger.setLevel(logging.WARNING)


def launch_record(out_dir: Path, rank: int) -> Path:
    return out_dir / PID_DIR / f"rank{rank}.checkpoint.json"


def own_checkpoint(out_dir: Path, rank: int, launch_id: str) -> Path | None:
    """The checkpoint in out_dir that this rank last saved during this launch (None before one)."""
    record = launch_record(out_dir, rank)
    if not record.is_file():
        return None
    saved = json.loads(record.read_text())
    return Path(saved["checkpoint"]) if saved.get("launch_id") == launch_id else None


@ray.remote(num_cpus=0)
class RunControl:
    """Between the driver and the workers: the stop request (set by the driver on Ctrl-C /
    SIGTERM, polled by the workers at each logging step) and rank 0's summary at the end."""

    def __init__(self):
        self.stop, self.summary = False, None

    def set(self) -> None:
        self.stop = True

    def is_set(self) -> bool:
        return self.stop

    def put_summary(self, summary: dict) -> None:
        self.summary = summary

    def get_summary(self) -> dict | None:
        return self.summary


def ray_checkpoint_launch(checkpoint: ray.train.Checkpoint) -> str | None:
    """The launch id in Ray's checkpoint (read from its storage; None when it has none)."""
    path = posixpath.join(checkpoint.path, LAUNCH_FILE)
    if checkpoint.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with checkpoint.filesystem.open_input_stream(path) as f:
        return json.loads(f.read()).get("launch_id")


def fetch_resume_files(checkpoint: ray.train.Checkpoint, rank: int, dest: Path) -> list[str]:
    """Copy the files of Ray's ``checkpoint`` that ``rank`` reads to resume (``resume_files``) into
    ``dest``, skipping those already there (same size): another rank of this node fetched the shared
    ones (one at a time, under a lock), or the run directory is shared. Hard links when the storage
    is a folder on this machine's file system. Returns the names fetched."""
    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    stored = {os.path.relpath(info.path.lstrip("/"), root.lstrip("/")): info
              for info in fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
              if info.type == pyarrow.fs.FileType.File}
    wanted = set(resume_files({name.split("/")[0] for name in stored}, rank))
    mine = {n: i for n, i in stored.items() if n.split("/")[0] in wanted}
    shared = {n: i for n, i in mine.items() if file_rank(n.split("/")[0]) is None}
    node_lock = hashlib.sha1(str(dest.resolve()).encode()).hexdigest()[:16]
    with filelock.FileLock(Path(tempfile.gettempdir()) / f"crossflow-fetch-{node_lock}.lock"):
        fetched = [n for n, info in sorted(shared.items()) if _fetch_file(fs, info, dest / n)]
    return fetched + [n for n, info in sorted(mine.items()) if n not in shared and _fetch_file(fs, info, dest / n)]


def _fetch_file(fs: pyarrow.fs.FileSystem, info: pyarrow.fs.FileInfo, target: Path) -> bool:
    """One stored file to ``target`` (renamed into place when complete); False when already there."""
    if target.is_file() and target.stat().st_size == info.size:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.fetch-{os.getpid()}")
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        link_or_copy(Path(info.path), partial)
    else:
        pyarrow.fs.copy_files(info.path, str(partial), source_filesystem=fs,
                              destination_filesystem=pyarrow.fs.LocalFileSystem())
    os.replace(partial, target)
    return True


def restore_ray_checkpoint(checkpoint: ray.train.Checkpoint | None, rank: int, out_dir: Path, launch_id: str,
                           resume: str) -> Path | None:
    """This rank's view of Ray's checkpoint in its node's run directory, fetched from the storage:
    when this launch wrote it (a worker restart), or with resume=auto; else None."""
    if checkpoint is None or (ray_checkpoint_launch(checkpoint) != launch_id and resume != "auto"):
        return None
    dest = checkpoint_root(out_dir) / posixpath.basename(checkpoint.path.rstrip("/"))
    fetch_resume_files(checkpoint, rank, dest)
    return dest


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker: the training loop of one rank, reporting to Ray."""
    from trainer.loop import train
    cfg = config_from_dict(config["cfg"])
    rank = ray.train.get_context().get_world_rank()
    quiet_ray_train_reports()
    out_dir = Path(cfg.train.out_dir)
    (out_dir / PID_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / PID_DIR / f"rank{rank}.pid").write_text(f"{os.getpid()}\n")
    control = config["control"]
    should_stop = lambda: ray.get(control.is_set.remote())  # noqa: E731
    context = ray.train.get_context()
    reporter = CheckpointReporter(out_dir, rank, context.get_local_rank(), config["launch_id"], cfg.train.keep_last)

    # A restart resumes from the newest checkpoint of this launch that every rank can read: Ray's
    # registered one, or the run's own newer copy when Ray lost the last report with the worker.
    # With train.resume=auto, also the run directory's latest (a launch after the driver died before
    # Ray registered it: a sweep resumed after its driver was killed).
    restored = restore_ray_checkpoint(ray.train.get_checkpoint(), rank, out_dir, config["launch_id"],
                                      cfg.train.resume)
    own = own_checkpoint(out_dir, rank, config["launch_id"])
    latest = latest_checkpoint(out_dir) if cfg.train.resume == "auto" else None
    candidates = [c for c in (restored, own, latest) if c is not None]
    summary = train(cfg, on_checkpoint=reporter, resume_from=candidates, should_stop=should_stop)
    if rank == 0:
        ray.get(control.put_summary.remote(summary))


# ----------------------------------------------------------------------------- driver side
def connect(cfg: Config) -> bool:
    """Join ``cluster.address`` / RAY_ADDRESS, or start an embedded local cluster for the run's
    workers. Returns True when this process started the cluster (and must shut it down)."""
    c = cfg.cluster
    return join_or_start(c.address or os.environ.get("RAY_ADDRESS", ""),
                         lambda: (c.num_workers * c.cpus_per_worker, c.num_workers * c.gpus_per_worker))


def join_or_start(address: str, local_size) -> bool:
    """Join the Ray cluster at ``address``, or start an embedded one of ``local_size()`` = (CPUs,
    GPUs). Nothing when Ray is already initialized. True when this process started the cluster."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "cluster.ray_train.worker_setup"})
        return False
    start_local_cluster(*local_size())
    return True


def start_local_cluster(cpus: float, gpus: float) -> None:
    """An embedded Ray cluster on this machine with ``cpus`` and ``gpus`` (rounded up), no dashboard."""
    # The embedded cluster lives and dies with this run on one machine: no node is ever preempted, and
    # Ray Train's preemption watcher only makes its controller log an error about the watcher's own
    # restart policy ("Actor with class name: 'PreemptionWatcher' ... max_restarts > 0").
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with quiet_token_notice():
        ray.init(address="local",  # a new cluster, even when `ray start` left one (or its address file) behind
                 num_cpus=max(1, math.ceil(cpus)), num_gpus=math.ceil(gpus) if gpus else None,
                 include_dashboard=False, log_to_driver=True,
                 runtime_env={"worker_process_setup_hook": "cluster.ray_train.embedded_worker_setup"})


@contextlib.contextmanager
def quiet_token_notice():
    """Ray turns on token authentication for every new local cluster (unless ``RAY_AUTH_MODE`` says
    otherwise) and says so at each start ("Token authentication is enabled for this Ray cluster ...",
    "Generated new authentication token ..."): the embedded cluster keeps the protection, without
    the notice. Errors still show."""
    setup_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    level = setup_logger.level
    setup_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        setup_logger.setLevel(level)


def worker_setup() -> None:
    """Every worker process of the run's jobs, at its start. Ray Train's placement-group cleaner asks
    the state API whether the run's controller is alive, at the address RAY_ADDRESS, ``ray start``'s
    last cluster or the only GCS running on the machine names: on a machine running another Ray
    cluster it asked that one (or failed: "multiple active Ray instances") and removed the run's
    placement group, killing its workers. RAY_ADDRESS = this cluster's GCS."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def embedded_worker_setup() -> None:
    """``worker_setup`` for the embedded cluster, which has no dashboard, hence no state API: the
    cleaner would warn that it cannot reach it every second."""
    import logging
    worker_setup()
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


class GracefulStop:
    """First SIGINT/SIGTERM: ask the workers to stop (final checkpoint). Second one, or
    ``timeout`` seconds later: KeyboardInterrupt in the driver, which ends the workers."""

    def __init__(self, flag, timeout: float):
        self.flag, self.timeout, self.requested = flag, timeout, False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"crossflow: {signal.Signals(signum).name}: stopping at the next logging step with a final "
              f"checkpoint (again to stop now; forced in {self.timeout:.0f} s)", flush=True)
        self.flag.set.remote()
        timer = threading.Timer(self.timeout, lambda: os.kill(os.getpid(), signal.SIGINT))
        timer.daemon = True
        timer.start()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def fit_in_thread(trainer: TorchTrainer):
    """``trainer.fit()`` off the main thread, so that Ray Train's own SIGINT handler (abort at once,
    no checkpoint) is not installed and ours (``GracefulStop``) keeps the signals."""
    outcome: dict = {}

    def target():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # re-raised in the main thread
            outcome["error"] = e
    thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def prepare_driver(cfg: Config) -> None:
    """On the driver, before the cluster starts: an absolute out_dir (workers may not share our cwd),
    relative data paths meaning the driver's cwd, the S3 endpoint for every process of the cluster."""
    cfg.train.out_dir = str(Path(cfg.train.out_dir).resolve())
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    if uses_s3(cfg):
        sync_endpoint_env()  # before the embedded cluster starts: its processes inherit it


def build_trainer(cfg: Config, control, callbacks: list | None = None) -> TorchTrainer:
    """The Ray Train run of ``cfg``: ``cluster.num_workers`` workers running ``train_worker`` (one
    DeepSpeed rank each), its FailureConfig, checkpoints and storage from ``cluster.*``; a new launch
    id. ``crossflow train`` fits it from the driver (``run_training``); a sweep fits one per Tune
    trial (``cluster/sweep.py``, with Tune's report callback in ``callbacks``). ``control``: a
    ``RunControl`` the workers poll for a stop request and give the summary to."""
    return TorchTrainer(
        train_worker,
        train_loop_config={"cfg": cfg.to_dict(), "launch_id": uuid.uuid4().hex, "control": control},
        scaling_config=scaling_config(cfg), run_config=ray_run_config(cfg, callbacks))


def run_training(cfg: Config) -> dict:
    """Train ``cfg`` on Ray (``cluster.*``); returns rank 0's summary (``trainer.loop.train``'s)."""
    prepare_driver(cfg)
    started = connect(cfg)
    try:
        control = RunControl.remote()
        trainer = build_trainer(cfg, control)
        t0 = time.perf_counter()
        with GracefulStop(control, cfg.cluster.stop_timeout_s):
            result = fit_in_thread(trainer)
        summary = ray.get(control.get_summary.remote())
        summary["ray_wall_s"] = time.perf_counter() - t0
        summary["ray_checkpoint"] = result.checkpoint.path if result.checkpoint else None
        return summary
    finally:
        if started:
            ray.shutdown()
