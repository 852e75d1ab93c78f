"""The DeepSpeed engine on CPU: 2 processes on gloo (torchrun), ZeRO 1/2/3 and one process reproduce
the golden losses (tests/golden/tiny_run.json), exact resume after a
kill, atomic saves under a kill, export, the NaN guard and W&B offline files."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.golden import REL_TOL, assert_matches_golden, golden, golden_overrides
from tests.support.faults import fault_env, installed, kill_in_save, measure_ema_weights, nan_loss_at
from trainer.checkpoint import latest_checkpoint, resume_files
from trainer.config import load_config
from trainer.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
STEPS = golden()["overrides"]["train.steps"]  # 20: the golden run (tests/golden/tiny_run.json)
# The shared runs also compute the validation loss (trainer/validation.py), which must not move them.
VALIDATION = {"eval.val_every": 10, "eval.val_samples": 32}


def overrides(out_dir, **extra) -> list[str]:
    return golden_overrides(out_dir, **extra)


def config(out_dir, **extra):
    """The same config the torchrun runs get (the golden run's config file + overrides)."""
    return load_config(REPO / golden()["config"], overrides(out_dir, **extra))


def torchrun(out_dir, nproc: int = 2, env: dict | None = None, **extra) -> subprocess.Popen:
    """2 ranks on gloo, each running `crossflow train` in-process (RANK set by torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "cluster.cli", "train", "--config", golden()["config"], *overrides(out_dir, **extra)]
    if nproc == 1:
        cmd = [sys.executable, "-m", "cluster.cli", "train", "--no-ray", "--config", golden()["config"],
               *overrides(out_dir, **extra)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(out_dir) / f"launch-{time.time_ns()}.log", "w")  # a file, not a pipe: never blocks
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    proc.log_path = log.name
    return proc


def output(proc: subprocess.Popen) -> str:
    return Path(proc.log_path).read_text()[-4000:]


def finish(proc: subprocess.Popen, timeout: int = 400) -> str:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, output(proc)
    return output(proc)


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step; the last record wins (a killed run's steps are redone after resume)."""
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def kill_after_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is not None and ckpt.name == f"step_{step:08d}":
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, output(proc)
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One single-process run and 2-process runs of ZeRO 1, 2 and 3 (shared by several tests), all at
    once: each spends much of its start-up waiting (rendezvous, process group, DeepSpeed's set-up),
    and every run is deterministic on its own (one thread per rank, noise keyed by sample)."""
    from trainer.loop import train
    root = tmp_path_factory.mktemp("engine")
    procs = [torchrun(root / f"zero{stage}", env=fault_env(measure_ema_weights(root / f"zero{stage}" / "probe")),
                      **{"train.zero_stage": stage, **VALIDATION}) for stage in (1, 2, 3)]
    train(config(root / "single", **{"train.zero_stage": 2, **VALIDATION}))
    for proc in procs:
        finish(proc)
    yield root
    for f in glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"):
        with __import__("contextlib").suppress(OSError):
            os.remove(f)


def test_single_process_reproduces_the_golden_losses(runs):
    single = losses(runs / "single")
    assert sorted(single) == list(range(1, STEPS + 1))
    assert_matches_golden(single, "one process")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_reproduces_the_golden_losses(runs, stage):
    """2 ranks (each half the global batch, noise keyed by the sample's place in it) give the one
    process's losses: checked against the stored numbers, not against another run of today's code."""
    dist = losses(runs / f"zero{stage}")
    assert sorted(dist) == list(range(1, STEPS + 1))
    assert_matches_golden(dist, f"2-rank ZeRO-{stage}")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_validation_loss_on_two_ranks_is_the_one_process_value(runs, stage):
    """The runs above validate at steps 10 and 20 (their golden losses show it changes no training
    step); 2 ranks split the fixed set and all-reduce the sums: the one process's values, going
    down. Under ZeRO-3 every rank joins each forward (a rank left out would hang the gathers)."""
    def values(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r}
    single, dist = values(runs / "single"), values(runs / f"zero{stage}")
    assert sorted(single) == sorted(dist) == [10, 20]
    for step in (10, 20):
        for key, value in single[step].items():
            if key.startswith("val/") and key != "val/seconds":
                assert dist[step][key] == pytest.approx(value, rel=REL_TOL), (step, key)
    assert single[20]["val/loss"] < single[10]["val/loss"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_rank_resumes_from_its_own_files_and_the_shared_ones(runs, stage):
    """``resume_files`` on a real 2-rank checkpoint (what a restarted Ray worker fetches): each rank
    gets its own ZeRO shards (optimizer; under ZeRO-3 also the model's), RNG and EMA partition,
    plus every shared file but the consolidated weights (resuming reads only their metadata, which
    model.json, config.yaml and crossflow_features.json hold); nothing of the other rank."""
    names = {p.name for p in latest_checkpoint(runs / f"zero{stage}").iterdir()}
    picks = {r: set(resume_files(names, r)) for r in (0, 1)}
    shared = {"trainer.pt", "model.json", "config.yaml", "crossflow_features.json"}
    shared |= set() if stage == 3 else {"mp_rank_00_model_states.pt", "ema.pt"}
    for r in (0, 1):
        own = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"rng_rank{r}.pt"}
        own |= {f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", f"ema_rank{r}.pt"} if stage == 3 else set()
        assert picks[r] == own | shared, (stage, r, sorted(names))
        assert "weights.safetensors" not in picks[r]
    assert picks[0] | picks[1] == names - {"weights.safetensors"}
    old = names - {"model.json"}  # a checkpoint written before model.json: its weights' header is needed
    assert "weights.safetensors" in set(resume_files(old, 1))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_only_rank0_builds_the_consolidated_ema(runs, stage):
    """At a save, rank 0 alone builds the float32 CPU copy of the EMA that weights.safetensors
    holds (4.6 GB a rank at 0.95B); rank 1 builds none (under ZeRO-3 it joins the gathers only).
    The file holds the EMA exactly: rank 0's ema.pt under ZeRO-1/2, the ranks' partitions joined
    under ZeRO-3."""
    from safetensors.torch import load_file
    run = runs / f"zero{stage}"
    ckpt = latest_checkpoint(run)
    weights = load_file(str(ckpt / "weights.safetensors"))
    built = [[r["bytes"] for r in read_metrics(run / "probe" / f"ema_weights_rank{rank}.jsonl")] for rank in (0, 1)]
    assert built == [[sum(t.nbytes for t in weights.values())], [0]]  # one save: the final one
    if stage < 3:
        ema = torch.load(ckpt / "ema.pt", weights_only=False)["shadow"]
    else:  # each rank's partition is a slice of the flattened, padded parameter
        parts = [torch.load(ckpt / f"ema_rank{r}.pt", weights_only=False)["shadow"] for r in (0, 1)]
        ema = {n: torch.cat([p[n] for p in parts])[:weights[n].numel()].view_as(weights[n]) for n in parts[0]}
    assert ema.keys() <= weights.keys()
    for name, shadow in ema.items():
        assert torch.equal(weights[name], shadow), name


def test_optimizer_offload_trains_like_the_resident_optimizer(runs, tmp_path):
    """ZeRO-2 on 2 ranks with the optimizer state in CPU memory (DeepSpeed's CPU Adam, JIT-built on
    first use) follows the same loss curve as the resident optimizer, and checkpoints."""
    run = tmp_path / "offload"
    finish(torchrun(run, **{"train.zero_stage": 2, "train.offload_optimizer": True, "train.ckpt_every": STEPS}))
    offload, resident = losses(run), losses(runs / "zero2")
    assert sorted(offload) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert offload[step] == pytest.approx(resident[step], rel=1e-5), step
    assert latest_checkpoint(run).name == f"step_{STEPS:08d}"


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_after_kill_is_exact(runs, tmp_path, stage):
    run = tmp_path / "run"
    proc = torchrun(run, **{"train.zero_stage": stage, "train.ckpt_every": 6})
    kill_after_checkpoint(proc, run, 6)
    finish(torchrun(run, **{"train.zero_stage": stage, "train.ckpt_every": 6, "train.resume": "auto"}))
    straight, resumed = losses(runs / f"zero{stage}"), losses(run)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=1e-7), step
    assert_matches_golden(resumed, f"ZeRO-{stage} killed after step 6 and resumed")


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    run = tmp_path / "run"
    proc = torchrun(run, nproc=1, env=fault_env(kill_in_save(8)),
                    **{"train.ckpt_every": 4, "train.steps": 12})
    proc.wait(timeout=400)
    assert proc.returncode == -signal.SIGKILL, output(proc)  # killed inside the save of step 8
    assert latest_checkpoint(run).name == "step_00000004"
    assert (run / "checkpoints" / ".tmp-step_00000008").is_dir()  # the half-written save
    finish(torchrun(run, nproc=1, **{"train.ckpt_every": 4, "train.steps": 12, "train.resume": "auto"}))
    assert latest_checkpoint(run).name == "step_00000012"
    assert not (run / "checkpoints" / ".tmp-step_00000008").exists()
    assert sorted(losses(run)) == list(range(1, 13))


def test_export_loads_into_a_plain_model_and_samples(runs, tmp_path):
    from safetensors.torch import load_file

    from trainer.export import export_checkpoint
    from trainer.inference import load_generator
    from trainer.models.families import model_from_args
    from trainer.checkpoint import load_weights

    out = export_checkpoint(runs / "zero3", tmp_path / "model.safetensors")
    tensors = load_file(str(out))
    _, args, _ = load_weights(out)
    args["latent_shape"] = tuple(args["latent_shape"])
    model = model_from_args(args)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    ema = {k[len("ema."):]: v for k, v in tensors.items() if k.startswith("ema.")}
    assert set(ema) == set(model.state_dict())
    assert any(not torch.equal(ema[k], v) for k, v in model.state_dict().items())  # EMA != live weights
    gen = load_generator(out)
    images = gen.generate(["two small red squares on the left"], seed=0, steps=3)
    assert images[0].shape == (32, 32, 3)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    from trainer.loop import NonFiniteLossError, train
    with installed(nan_loss_at([3])):
        summary = train(config(tmp_path / "a", **{"train.steps": 6}))
    assert summary["skipped_steps"] == 1
    records = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "loss" in r]
    assert records[-1]["skipped_steps"] == 1 and all(r["loss"] == r["loss"] for r in records)  # finite

    run = tmp_path / "b"
    with installed(nan_loss_at([3, 4, 5])), pytest.raises(NonFiniteLossError, match="3 optimizer steps in a row"):
        train(config(run, **{"train.steps": 10, "train.ckpt_every": 2, "train.max_nonfinite_steps": 3}))
    good = latest_checkpoint(run)
    assert good.name == "step_00000004"  # saved during the streak: the skipped steps changed nothing
    summary = train(config(run, **{"train.steps": 8, "train.resume": "auto"}))
    assert summary["steps"] == 8 and summary["skipped_steps"] == 0


def test_wandb_offline_run_holds_metrics_and_samples(tmp_path):
    from trainer.loop import train
    train(config(tmp_path, **{"train.steps": 4, "train.sample_every": 2,
                                                   "log.wandb": "offline", "log.wandb_group": "g1"}))
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    images = glob.glob(os.path.join(runs[0], "files", "media", "images", "*.png"))
    assert images, "no sample image in the W&B run"
    blob = b"".join(Path(p).read_bytes() for p in glob.glob(os.path.join(runs[0], "*.wandb")))
    assert b"flow_matching" in blob and b"samples_per_s" in blob
    assert (tmp_path / "metrics.jsonl").is_file()  # the JSONL log stays


def _agree_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    import torch.distributed as dist
    from trainer.checkpoint import agree_on_resume
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    root_path = Path(root)
    # rank 0 sees step 20 (Ray's copy) and step 40 (the run's own); rank 1's node lacks its step-40 file
    candidates = [root_path / "ray" / "step_00000020", root_path / "own" / "step_00000040",
                  root_path / "own" / "step_00000020"]
    chosen = agree_on_resume(candidates, rank)
    Path(out, f"rank{rank}.txt").write_text(str(chosen))
    dist.destroy_process_group()


def test_ranks_agree_on_the_newest_checkpoint_all_can_read(tmp_path):
    """A restart's candidates differ per rank: the ranks resume from the newest step every rank has
    (its trainer.pt and that rank's RNG file), and a tie goes to the earlier candidate."""
    import socket
    import torch.multiprocessing as mp
    for where, step, ranks in (("ray", 20, (0, 1)), ("own", 20, (0, 1)), ("own", 40, (0,))):
        ckpt = tmp_path / where / f"step_{step:08d}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer.pt").write_text("")
        for r in ranks:
            (ckpt / f"rng_rank{r}.pt").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_agree_worker, args=(2, port, str(tmp_path), str(tmp_path)), nprocs=2)
    for r in (0, 1):
        assert (tmp_path / f"rank{r}.txt").read_text() == str(tmp_path / "ray" / "step_00000020")


def test_adamw_is_fused_on_cuda_and_the_ema_one_foreach_lerp():
    """deepspeed_config asks torch's AdamW for fused=True on CUDA only (DeepSpeed's CPU Adam with
    offload); the EMA's for-each lerp gives the bits of a lerp_ per tensor."""
    from trainer.config import Config
    from trainer.engine import EMA, EMA_WARMUP, deepspeed_config
    cfg = Config()
    params = lambda device: deepspeed_config(cfg.train, cfg.optim, 2, 1, device)["optimizer"]["params"]  # noqa: E731
    assert params("cuda")["fused"] is True and "fused" not in params("cpu")
    cfg.train.offload_optimizer = True
    assert "fused" not in params("cuda") and params("cuda")["torch_adam"] is False

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema, want = EMA(model, 0.99), {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        d = min(0.99, (1 + step) / (EMA_WARMUP + step))
        for n, p in model.named_parameters():
            want[n].lerp_(p.detach(), 1.0 - d)
    assert all(torch.equal(ema.shadow[n], want[n]) for n in want)
