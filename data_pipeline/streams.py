"""Endless, resumable batch streams for training: ``next(stream)`` is a batch dict, ``state_dict()``
is where the stream stands and ``load_state_dict`` resumes exactly the batches that follow.

``ShapesStream``: the synthetic shapes dataset, one permutation per (seed, epoch) dealt to the ranks.
``ShardStream``: MDS or WebDataset shards (local or s3://) through ``data_pipeline.readers``.
Nothing here knows the model, the training loop or the launcher.

``pin_memory=True`` (the loop asks for it on CUDA) hands out batches in pinned (page-locked) host
memory, so the loop's ``.to(device, non_blocking=True)`` really overlaps (from pageable memory a
"non-blocking" copy is synchronous). The shapes stream pins in its DataLoader's pinning thread; the
shard stream pins each batch as it hands it out (one host memcpy: its batches are featurized in
this process, after the DataLoader).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from data_pipeline.datasets import ShapesTextDataset


@dataclass
class DataPosition:
    """Where the shapes stream stands: resuming from it replays exactly the batches that follow."""
    epoch: int = 0
    batch_in_epoch: int = 0


class EpochSampler(Sampler[int]):
    """A permutation per (seed, epoch), dealt round-robin to ranks, starting at ``start``."""

    def __init__(self, n: int, seed: int, epoch: int, rank: int, world_size: int, start: int = 0):
        self.n, self.seed, self.epoch, self.rank, self.world, self.start = n, seed, epoch, rank, world_size, start

    def indices(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world  # every rank gets the same count
        return perm[self.rank::self.world][:per_rank][self.start:].tolist()

    def __iter__(self):
        return iter(self.indices())

    def __len__(self) -> int:
        return self.n // self.world - self.start


def pin_batch(batch: dict) -> dict:
    """The batch with every tensor in pinned host memory (other values as they are)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) and not v.is_pinned() else v for k, v in batch.items()}


def iterate_batches(dataset, batch_size: int, seed: int, rank: int, world_size: int, num_workers: int,
                    position: DataPosition, pin_memory: bool = False):
    """Batches forever, epoch after epoch; ``position`` is advanced as each batch is handed out."""
    while True:
        sampler = EpochSampler(len(dataset), seed, position.epoch, rank, world_size,
                               position.batch_in_epoch * batch_size)
        if len(sampler) < batch_size and position.batch_in_epoch == 0:
            raise ValueError(f"dataset of {len(dataset)} samples is smaller than one batch per rank ({batch_size})")
        # Its own generator: creating an iterator must not draw from the global RNG (exact resume).
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                            num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
                            generator=torch.Generator().manual_seed(seed + position.epoch))
        for batch in loader:
            position.batch_in_epoch += 1
            yield batch
        position.epoch += 1
        position.batch_in_epoch = 0


class ShapesStream:
    """The synthetic shapes dataset as an endless, resumable stream of batches."""

    def __init__(self, dataset: ShapesTextDataset, batch_size: int, seed: int, rank: int, world_size: int,
                 num_workers: int, pin_memory: bool = False):
        self.dataset, self.position, self.pin_memory = dataset, DataPosition(), pin_memory
        self._args = (dataset, batch_size, seed, rank, world_size, num_workers)
        self._it = None

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iterate_batches(*self._args, self.position, self.pin_memory)
        return next(self._it)

    def state_dict(self) -> dict:
        return {"epoch": self.position.epoch, "batch_in_epoch": self.position.batch_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.position, self._it = DataPosition(**state), None

    def close(self) -> None:
        self._it = None  # the DataLoader's workers end with their iterator


class ShardStream:
    """MDS or WebDataset shards (local or s3://) as an endless, resumable stream of batches."""

    def __init__(self, loader, pin_memory: bool = False):
        from data_pipeline.readers import iterate_forever
        self.loader, self._iterate, self.pin_memory = loader, iterate_forever, pin_memory
        self._it = None

    def __next__(self) -> dict:
        if self._it is None:
            self._it = self._iterate(self.loader)
        batch = next(self._it)
        return pin_batch(batch) if self.pin_memory else batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)
        self._it = None

    def close(self) -> None:
        """Stop iterating and release what the loader holds (MDS: streaming's shared memory)."""
        self._it = None
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()
