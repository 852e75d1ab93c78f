"""The core trainer's model and objective train from MDS shards on the local S3 endpoint,
streamed with 2 forked workers, and the data position resumes exactly. (A plain AdamW stands in
for the trainer's engine, which this test does not need to exercise.)"""
from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.readers import iterate_forever, shard_loader_from_config
from tests.conftest import tiny_overrides
from tests.data.conftest import shapes_records, write_records

pytestmark = pytest.mark.timeout(300)


def test_trainer_steps_from_s3_mds(bucket, tmp_path):
    from trainer.config import load_config
    from trainer.inference import build_codec
    from trainer.loop import build_model, build_ops
    from trainer.models.codecs import batch_target
    from trainer.objectives import crossflow_losses

    path = write_records("mds", f"{bucket}/train", shapes_records(64), shard_bytes=6000)
    cfg = load_config(None, tiny_overrides(tmp_path / "run", **{
        "data.source": "mds", "data.path": path, "data.num_workers": 2, "train.global_batch_size": 8}))
    assert cfg.data.cache_dir is None  # defaults to <out_dir>/shard_cache for s3://

    def loader():
        return shard_loader_from_config(cfg.data, 8, rank=0, world_size=1, seed=cfg.train.seed,
                                        out_dir=cfg.train.out_dir)

    torch.manual_seed(0)
    device = torch.device("cpu")
    codec = build_codec(cfg)
    model = build_model(cfg, codec.latent_shape, 32, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ops = build_ops(cfg.model.kernels, device)
    data = loader()
    batches = iterate_forever(data)
    losses, seen, state = [], [], None
    for step in range(10):  # 64 samples / 8 = 8 batches per epoch: crosses an epoch boundary
        batch = next(batches)
        seen.append(list(batch["caption"]))
        if step == 6:
            state = data.state_dict()
            after = [list(next(batches)["caption"]) for _ in range(3)]
            seen.extend(after)
            break
        z1 = batch_target(batch, codec)
        assert z1.shape == (8, *codec.latent_shape)
        out = crossflow_losses(model, z1, batch["text_emb"], batch["text_mask"], cfg.objective, ops)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(float(out.total.detach()))
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "run" / "shard_cache").is_dir()
    # a restarted run continues the data stream exactly where the checkpoint left it
    resumed = loader()
    resumed.load_state_dict(state)
    it = iterate_forever(resumed)
    assert [list(next(it)["caption"]) for _ in range(3)] == seen[7:10]  # last batch of epoch 0, first two of epoch 1
