"""The validation loss (trainer/validation.py): a fixed set, t grid and noise; the same value for
the same weights whatever the ranks and batching; held-out shapes scenes; held-out MDS shards end to
end; bad configs. One process and 2-rank ZeRO 1/2/3 with validation on are compared in
tests/test_engine.py (the golden runs, whose losses it must not move)."""
from __future__ import annotations

import glob
import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.data.conftest import shapes_records, write_records
from trainer.config import ConfigError, load_config


def tiny_validation_pieces(tmp_path, **extra):
    """A tiny CrossFlow with its codec, ops and text encoder, for evaluating sets directly."""
    from data_pipeline.features import text_encoder_from_config
    from trainer.loop import build_model, build_ops
    from trainer.model_input import resolve_model_input
    from trainer.models.codecs import build_codec
    cfg = load_config(None, tiny_overrides(tmp_path, **{"eval.val_every": 1, **extra}))
    encoder = text_encoder_from_config(cfg.data)
    model_input = resolve_model_input(cfg, None, None, encoder.dim)
    torch.manual_seed(0)
    model = build_model(cfg, model_input.latent_shape, model_input.text_dim, torch.device("cpu")).eval()
    return cfg, encoder, model_input, model, build_codec(model_input), build_ops("torch", torch.device("cpu"))


def test_the_same_weights_give_the_same_value_on_any_ranks_and_batching_run_after_run(tmp_path):
    """37 samples: one rank in batches of 37 or 5, two ranks in batches of 6 (rank 1 runs out of
    samples first and pads with a zero-weight row, so both run 4 batches), summed as the all-reduce
    sums them; the same call twice is bit-identical."""
    import contextlib

    from trainer.validation import build_validation_set, time_grid, validation_metrics, validation_sums
    cfg, encoder, model_input, model, codec, ops = tiny_validation_pieces(
        tmp_path, **{"eval.val_samples": 37, "eval.val_t_points": 3})
    times = time_grid(3)
    assert times == [1 / 6, 0.5, 5 / 6]

    def value(sets: list, batch_size: int) -> dict:
        sums = sum(validation_sums(model, ops, codec, s.batches(batch_size, len(sets)), times,
                                   cfg.objective.sigma_min, contextlib.nullcontext, torch.device("cpu"))
                   for s in sets)
        return validation_metrics(sums, times, with_kl=True)

    whole = build_validation_set(cfg, encoder, model_input, 0, 1)
    halves = [build_validation_set(cfg, encoder, model_input, r, 2) for r in (0, 1)]
    assert whole.index.tolist() == list(range(37))
    assert halves[0].index.tolist() == list(range(0, 37, 2)) and halves[1].index.tolist() == list(range(1, 37, 2))
    assert torch.equal(halves[1].eps, whole.eps[1::2])  # noise keyed by the position in the set, not the rank
    assert len(list(halves[0].batches(6, 2))) == len(list(halves[1].batches(6, 2))) == 4
    assert [b["weight"].sum().item() for b in halves[1].batches(6, 2)] == [6, 6, 6, 0]

    one = value([whole], 37)
    assert value([whole], 37) == one  # run twice: identical
    assert set(one) == {"val/loss", "val/flow_matching_t0.1667", "val/flow_matching_t0.5",
                        "val/flow_matching_t0.8333", "val/kl"}
    assert one["val/loss"] == pytest.approx(sum(one[f"val/flow_matching_t{t:.4g}"] for t in times) / 3, rel=1e-12)
    for other in (value([whole], 5), value(halves, 6)):
        for k, v in one.items():
            assert other[k] == pytest.approx(v, rel=1e-6), k


def test_shapes_validation_scenes_are_not_training_scenes(tmp_path):
    """At 16 px 2,000 training scenes cover enough of the scene space that the validation generator's
    first 64 scenes include training ones (caption and pixels equal); the set skips them. Checked on
    rendered samples, not on the fingerprints the set is built from."""
    from data_pipeline.shapes import ShapesGenerator
    from trainer.validation import shapes_validation_generator, shapes_validation_indices
    cfg = load_config(None, tiny_overrides(tmp_path, **{"data.resolution": 16, "data.num_samples": 2000,
                                                          "eval.val_samples": 64}))

    def identity(s: dict) -> tuple:
        return s["caption"], s["image"].tobytes()
    training = ShapesGenerator(16, 1, "train", cfg.data.seed)
    seen = {identity(training.sample(i)) for i in range(cfg.data.num_samples)}
    gen = shapes_validation_generator(cfg)
    assert any(identity(gen.sample(j)) in seen for j in range(64)), "the test lost its teeth: no naive collision"
    picked = shapes_validation_indices(cfg)
    assert len(picked) == 64 and not any(identity(gen.sample(j)) in seen for j in picked)
    assert all(not gen.scene(j).is_heldout() for j in picked)  # the training split's distribution


def test_validation_from_held_out_mds_shards_end_to_end(tmp_path):
    """Training on MDS shards with held-out MDS shards: a record of val values in metrics.jsonl every
    2 steps and at the end (step 7), the loss going down, the values in every checkpoint report
    (what Ray Train's report and Tune's rows carry), the summary and the W&B offline run."""
    from trainer.loop import train
    from trainer.metrics import read_metrics
    train_path = write_records("mds", str(tmp_path / "train"), shapes_records(48))
    val_path = write_records("mds", str(tmp_path / "val"), shapes_records(40, seed=1))
    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides(run, **{
        "data.source": "mds", "data.path": train_path, "data.val_path": val_path, "train.steps": 7,
        "train.ckpt_every": 4, "eval.val_every": 2, "eval.val_samples": 32, "log.wandb": "offline"}))
    reports = []
    summary = train(cfg, on_checkpoint=lambda step, ckpt, metrics: reports.append((step, metrics)))

    val = [r for r in read_metrics(run / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in val] == [2, 4, 6, 7]
    assert all(math.isfinite(r["val/loss"]) for r in val) and "loss" not in val[0]  # a record of its own
    assert val[-1]["val/loss"] < val[0]["val/loss"]
    assert [(s, m["val/loss"]) for s, m in reports] == [(4, val[1]["val/loss"]), (7, val[-1]["val/loss"])]
    assert "loss" in reports[-1][1]  # the training loss reported beside it
    assert reports[0][1]["val/step"] == 4 and summary["val/step"] == 7 and summary["val/loss"] == val[-1]["val/loss"]
    (wandb_run,) = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert b"val/loss" in b"".join(Path(p).read_bytes() for p in glob.glob(os.path.join(wandb_run, "*.wandb")))


def _save_share(rank: int, port: int, overrides: list[str], out: str) -> None:
    """Rank ``rank`` of 2 on gloo builds its share of the validation set and saves it."""
    import torch.distributed as dist

    from data_pipeline.features import text_encoder_from_config
    from trainer.model_input import resolve_model_input
    from trainer.validation import build_validation_set
    # streaming reads its world from the environment
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_config(None, overrides)
        encoder = text_encoder_from_config(cfg.data)
        share = build_validation_set(cfg, encoder, resolve_model_input(cfg, None, None, encoder.dim), rank, 2)
        torch.save({"index": share.index, "image": share.target["image"]}, Path(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_validation_shards_on_s3_are_the_first_samples_in_stored_order(bucket, tmp_path, fmt):
    """Held-out shards on S3 (the real RGW), several shards: each of 2 ranks gets its every other
    sample of the first eval.val_samples, as stored. MDS on 2 spawned gloo ranks: streaming builds
    its reader collectively, and a node's ranks must share its cache folder (with a folder per
    process rank 1 waited for an index nobody downloaded). WebDataset: rank 1 in this process."""
    import socket

    import torch.multiprocessing as mp

    from data_pipeline.readers import record_to_sample
    records = shapes_records(30, seed=1)
    val_path = write_records(fmt, f"{bucket}/val", records, shard_bytes=3000)
    train_path = write_records(fmt, str(tmp_path / "train"), shapes_records(8))
    overrides = tiny_overrides(tmp_path / "run", **{"data.source": fmt, "data.path": train_path,
                                                     "data.val_path": val_path, "eval.val_every": 1,
                                                     "eval.val_samples": 25})
    if fmt == "mds":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_save_share, args=(port, overrides, str(tmp_path)), nprocs=2)
        ranks = (0, 1)
    else:
        from trainer.validation import build_validation_set
        cfg, encoder, model_input, *_ = tiny_validation_pieces(tmp_path, **dict(o.split("=", 1) for o in overrides))
        share = build_validation_set(cfg, encoder, model_input, 1, 2)
        torch.save({"index": share.index, "image": share.target["image"]}, tmp_path / "rank1.pt")
        ranks = (1,)
    want = torch.stack([record_to_sample(r, 32)["image"] for r in records[:25]])
    for rank in ranks:
        share = torch.load(tmp_path / f"rank{rank}.pt")
        assert share["index"].tolist() == list(range(rank, 25, 2))
        assert torch.equal(share["image"], want[rank::2])


def test_bad_validation_configs_fail_naming_the_key(tmp_path):
    from trainer.validation import build_validation_set
    shards = write_records("mds", str(tmp_path / "train"), shapes_records(12))
    held_out = write_records("mds", str(tmp_path / "val"), shapes_records(12, seed=1))
    mds = {"data.source": "mds", "data.path": shards}
    bad = [({**mds, "eval.val_every": 5}, "data.val_path"),
           ({"data.val_path": shards}, "data.val_path"),
           ({**mds, "data.val_path": shards + "/"}, "data.val_path"),
           ({"eval.val_every": -1}, "eval.val_every"),
           ({"eval.val_samples": 0}, "eval.val_samples"),
           ({"eval.val_t_points": 0}, "eval.val_t_points"),
           ({"data.val_path": "s3://"}, "data.val_path")]
    for extra, key in bad:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, tiny_overrides(tmp_path, **extra))

    cfg, encoder, model_input, *_ = tiny_validation_pieces(tmp_path, **{**mds, "data.val_path": held_out,
                                                                          "eval.val_samples": 20})
    with pytest.raises(ValueError, match=r"holds 12 samples, fewer than eval\.val_samples=20"):
        build_validation_set(cfg, encoder, model_input, 0, 1)
    cfg.data.val_path = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"data\.val_path=.*missing: no such folder"):
        build_validation_set(cfg, encoder, model_input, 0, 1)
    import numpy as np

    from trainer.loop import check_data_before_launch
    records = [{**r, "text_emb": np.zeros((12, 7), np.float16), "text_mask": np.ones(12, bool)}
               for r in shapes_records(4)]
    cfg.data.val_path = write_records("mds", str(tmp_path / "val-7d"), records)
    with pytest.raises(ValueError, match=r"data\.val_path=.*val-7d holds other data than data\.path=.*: text width 7 vs"):
        check_data_before_launch(cfg)  # before any worker starts
    cfg.data.source, cfg.data.val_path, cfg.eval.val_samples = "shapes", "", 1
    with pytest.raises(ValueError, match=r"eval\.val_samples=1 is smaller than the world size 2"):
        build_validation_set(cfg, encoder, model_input, 0, 2)
    json.dumps(cfg.to_dict())  # the new keys serialize (checkpoints and config.json store them)
