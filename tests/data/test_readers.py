"""Readers yield the trainer's batch format from MDS and WebDataset, shuffle, partition, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.features import load_text_encoder
from data_pipeline.readers import build_shard_loader
from data_pipeline.shapes import image_to_tensor_array
from tests.data.conftest import shapes_records
from tests.support.tiny_models import TINY_TEXT_WIDTH, tiny_text_encoder


def _features(records, n_tok=6):
    enc = load_text_encoder(tiny_text_encoder())
    emb, mask = enc.encode([r["caption"] for r in records], n_tok)
    for r, e, m in zip(records, emb, mask):
        r["text_emb"], r["text_mask"] = e, m
    return records


def _take(loader, n=None) -> list[dict]:
    out, it = [], iter(loader)
    while n is None or len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _fingerprint(batches) -> list[tuple]:
    return [(tuple(b["caption"]), float(b.get("image", b.get("latent")).double().sum())) for b in batches]


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_batch_format_with_stored_features(shapes_shards, fmt):
    records = _features(shapes_records(20))
    path = shapes_shards(fmt, records=records)
    loader = build_shard_loader(path, fmt, 4, shuffle=False, drop_last=True)
    batches = _take(loader)
    assert len(batches) == 5
    b = batches[0]
    assert set(b) == {"image", "text_emb", "text_mask", "caption"}
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["text_emb"].shape == (4, 6, TINY_TEXT_WIDTH) and b["text_emb"].dtype == torch.float32
    assert b["text_mask"].dtype == torch.bool and b["text_mask"].shape == (4, 6)
    assert isinstance(b["caption"], list) and isinstance(b["caption"][0], str)
    # unshuffled: the write order, pixels equal to the source's (PNG is lossless)
    from data_pipeline.shapes import ShapesGenerator
    first = ShapesGenerator(32).sample(0)
    assert b["caption"][0] == first["caption"]
    assert torch.equal(b["image"][0], torch.from_numpy(image_to_tensor_array(first["image"])))
    assert torch.equal(b["text_emb"][0], torch.from_numpy(records[0]["text_emb"].astype(np.float32)))
    assert torch.equal(b["text_mask"][0], torch.from_numpy(records[0]["text_mask"]))


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_text_features_in_main_process_and_latents(shapes_shards, fmt):
    records = shapes_records(12)
    for i, r in enumerate(records):
        r["latent"] = np.full((4, 4, 4), i, np.float16)
    path = shapes_shards(fmt, records=records)
    loader = build_shard_loader(path, fmt, 4, shuffle=False, num_workers=2, text_encoder=tiny_text_encoder(),
                                max_tokens=5, drop_last=False)
    batches = _take(loader)
    assert {tuple(sorted(b)) for b in batches} == {("caption", "latent", "text_emb", "text_mask")}
    lat = torch.cat([b["latent"] for b in batches])
    assert sorted(lat[:, 0, 0, 0].tolist()) == list(range(12))
    assert batches[0]["text_emb"].shape == (4, 5, TINY_TEXT_WIDTH)
    no_encoder = build_shard_loader(path, fmt, 4, shuffle=False)
    with pytest.raises(RuntimeError, match="no text features"):
        _take(no_encoder)


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_shuffle_is_seeded_and_changes_per_epoch(shapes_shards, fmt):
    path = shapes_shards(fmt, n=40)
    mk = lambda seed: build_shard_loader(path, fmt, 5, shuffle=True, seed=seed, text_encoder=tiny_text_encoder())  # noqa: E731
    a = mk(1)
    e1, e2 = _fingerprint(_take(a)), _fingerprint(_take(a))
    assert e1 == _fingerprint(_take(mk(1)))  # same seed, same order
    assert e1 != _fingerprint(_take(mk(2)))
    caps = lambda fp: sorted(c for cs, _ in fp for c in cs)  # noqa: E731
    assert caps(e1) == caps(e2)  # every epoch is a permutation of the same samples
    assert e1 != e2


def test_wds_ranks_and_workers_partition_the_epoch(shapes_shards):
    path = shapes_shards("wds", n=48, shard_bytes=4000)
    seen = []
    for rank in range(2):
        loader = build_shard_loader(path, "wds", 3, rank=rank, world_size=2, num_workers=2, shuffle=True, seed=5,
                                    drop_last=False, text_encoder=tiny_text_encoder())
        seen.append([c for b in _take(loader) for c in b["caption"]])
    keys_all = sorted(r["caption"] for r in shapes_records(48))
    assert sorted(seen[0] + seen[1]) == keys_all  # together: every sample once
    assert seen[0] and seen[1]


def _mds_rank_captions(rank: int, path: str, out: str, port: int) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)  # as train() does
    loader = build_shard_loader(path, "mds", 3, rank=rank, world_size=2, num_workers=0, shuffle=True, seed=5,
                                drop_last=False)  # stored text features: no encoder to load in each process
    captions = [c for b in _take(loader) for c in b["caption"]]
    open(f"{out}/rank{rank}.txt", "w").write("\n".join(captions))


def test_mds_ranks_partition_the_epoch(shapes_shards, tmp_path):
    """Two processes as ranks 0 and 1 of one node (mosaicml-streaming coordinates them through
    shared memory): every sample read once, an equal count per rank (48 = 2 x 24, no padding)."""
    import socket
    import torch.multiprocessing as mp
    path = shapes_shards("mds", records=_features(shapes_records(48)), shard_bytes=4000)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_mds_rank_captions, args=(path, str(tmp_path), port), nprocs=2)
    seen = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 24
    assert sorted(seen[0] + seen[1]) == sorted(r["caption"] for r in shapes_records(48))


def test_mds_world_env_contradiction_is_refused(shapes_shards, monkeypatch):
    path = shapes_shards("mds", n=8)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="in the environment but the loader was asked for"):
        build_shard_loader(path, "mds", 2, rank=1, world_size=2)


@pytest.mark.parametrize("fmt,workers", [("mds", 0), ("mds", 2), ("wds", 0), ("wds", 2)])
def test_mid_epoch_resume_is_exact(shapes_shards, fmt, workers):
    """Read k batches, save the state; a new loader from it yields exactly what an uninterrupted
    loader yields next (and the following epoch too)."""
    path = shapes_shards(fmt, n=50, shard_bytes=4000)
    mk = lambda: build_shard_loader(path, fmt, 4, num_workers=workers, shuffle=True, seed=7, drop_last=False,  # noqa: E731
                                    text_encoder=tiny_text_encoder())
    ref = mk()
    full = _fingerprint(_take(ref))
    next_epoch = _fingerprint(_take(ref))
    for k in (3, 7):
        first = mk()
        head = _fingerprint(_take(first, k))
        state = first.state_dict()
        resumed = mk()
        resumed.load_state_dict(state)
        tail = _fingerprint(_take(resumed))
        assert head == full[:k]
        assert tail == full[k:], f"resume after {k} batches diverged"
        assert _fingerprint(_take(resumed)) == next_epoch


def test_wds_resume_refuses_other_worker_count(shapes_shards):
    path = shapes_shards("wds", n=20)
    a = build_shard_loader(path, "wds", 4, num_workers=2, text_encoder=tiny_text_encoder())
    _take(a, 1)
    b = build_shard_loader(path, "wds", 4, num_workers=0, text_encoder=tiny_text_encoder())
    with pytest.raises(ValueError, match="num_workers"):
        b.load_state_dict(a.state_dict())


def test_resolution_resizes_images(shapes_shards):
    path = shapes_shards("wds", n=4)
    b = _take(build_shard_loader(path, "wds", 4, shuffle=False, resolution=16, text_encoder=tiny_text_encoder()))[0]
    assert b["image"].shape == (4, 3, 16, 16)
    assert b["image"].min() >= -1 and b["image"].max() <= 1


@pytest.mark.parametrize("fmt", ["mds", "wds"])
def test_iterate_forever_resumes_across_epochs(shapes_shards, fmt):
    """The trainer's stream: state taken between batches resumes exactly, also at and across
    an epoch boundary (an epoch resumed at its end yields nothing and the next begins)."""
    from data_pipeline.readers import iterate_forever
    path = shapes_shards(fmt, n=24, shard_bytes=4000)
    mk = lambda: build_shard_loader(path, fmt, 4, num_workers=2, shuffle=True, seed=2,  # noqa: E731
                                    text_encoder=tiny_text_encoder())
    ref = iterate_forever(mk())
    expect = [tuple(next(ref)["caption"]) for _ in range(15)]
    for k in (6, 7):  # 6 = exactly at the end of epoch 0
        loader = mk()
        it = iterate_forever(loader)
        head = [tuple(next(it)["caption"]) for _ in range(k)]
        state = loader.state_dict()
        resumed = mk()
        resumed.load_state_dict(state)
        it2 = iterate_forever(resumed)
        assert head + [tuple(next(it2)["caption"]) for _ in range(15 - k)] == expect




def _open_shared_memory(exclude: set[str]) -> list[str]:
    """Names of the /dev/shm blocks this process holds open, but those in ``exclude``."""
    import os
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        name = target.removeprefix("/dev/shm/").removesuffix(" (deleted)")
        if target.startswith("/dev/shm/") and name not in exclude:
            names.append(name)
    return names


@pytest.mark.skipif(not __import__("os").path.isdir("/dev/shm"), reason="reads /proc/self/fd and /dev/shm")
def test_describing_and_closing_mds_shards_releases_their_shared_memory(shapes_shards):
    """streaming closes a dataset's shared memory only at the process's exit (atexit), and each new
    dataset opens every existing one's blocks while picking its prefix: a process that reads shards
    again and again (describing them before every launch, a sweep's driver, this suite) ran out of
    file descriptors. Describing shards releases its dataset's blocks at once, and a closed loader
    its own: none of the blocks made here stays open. (Blocks that existed before, other datasets'
    or stale ones of killed processes, are streaming's to leak while it scans them: not counted.)"""
    import os

    from data_pipeline.readers import describe_shards
    path = shapes_shards("mds", records=_features(shapes_records(8)))
    existing = set(os.listdir("/dev/shm"))
    for _ in range(3):
        describe_shards(path)
        loader = build_shard_loader(path, "mds", 4, shuffle=False, drop_last=True)
        _take(loader)
        loader.close()
    assert _open_shared_memory(existing) == []  # before: 6 blocks per dataset, 36 here
