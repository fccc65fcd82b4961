"""Streaming shards to a model (torch): batches from WebDataset shards, each sample exactly once per
epoch whatever the loader workers and ranks. The data stages never import this module."""
from __future__ import annotations

import multiprocessing
import random

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from pipeline.data.seeds import derive_seed
from pipeline.errors import DataError, PipelineError


class ShardStream(IterableDataset):
    """Batches streamed from WebDataset shards.

    Shards are split across distributed ranks, then across loader workers, so each sample is
    read by exactly one worker of one rank per epoch. Training streams shuffle the shard order
    per epoch and samples through a buffer, both seeded by (seed, epoch, rank, worker); each
    sample's augmentation draws from its own stream, seeded by (seed, epoch, key). The epoch is
    shared memory so that persistent workers see `set_epoch`.

    `transform(png_bytes, label, augment_rng, *members)` runs in the workers and returns (image array,
    target ids); `members` are the bytes of the extra members named by `members` (e.g. "npy");
    batches are (images, targets, target_lengths, labels, keys).
    """

    def __init__(self, shards: list[str], transform, batch_size: int, shuffle: bool = False,
                 shuffle_buffer: int = 2000, seed: int = 0, members: tuple[str, ...] = ()):
        self.shards = list(shards)
        self.members = members
        self.transform = transform
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self._epoch = multiprocessing.get_context("fork").Value("i", 0, lock=False)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __iter__(self):
        epoch = self._epoch.value
        rank, world, worker, _ = wds.utils.pytorch_worker_info()
        urls = list(self.shards)
        if self.shuffle:
            random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(urls)
        rng = random.Random(derive_seed(self.seed, "samples", epoch, rank, worker))
        stages = [wds.SimpleShardList(urls), wds.split_by_node, wds.split_by_worker,
                  wds.tarfile_to_samples(handler=stop_on_bad_shard)]
        if self.shuffle:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng))

        def apply(sample):
            # each sample's augmentation has a stream of its own: the same whatever the workers
            key = sample["__key__"]
            try:
                label = sample["txt"].decode("utf-8")
                augment_rng = random.Random(derive_seed(self.seed, "augment", epoch, key))
                extra = [sample[m] for m in self.members]
                return (*self.transform(sample["png"], label, augment_rng, *extra), label, key)
            except Exception as e:  # noqa: BLE001 - whatever is wrong with it, name the sample
                reason = f"no {e} member" if isinstance(e, KeyError) else str(e).split(" (")[0]
                raise DataError(f"{sample.get('__url__', '?')}: sample {key}: {reason}") from None

        stages += [
            wds.map(apply),
            wds.batched(self.batch_size, collation_fn=collate, partial=True),
        ]
        return iter(wds.DataPipeline(*stages))


def stop_on_bad_shard(exn: Exception) -> bool:
    """webdataset's handler for a shard it cannot read: stop, naming the shard (its last arg)."""
    where = next((a for a in reversed(exn.args) if isinstance(a, str) and a.endswith(".tar")), "a shard")
    reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
    raise DataError(f"{where}: unreadable shard ({reason}); rebuild it") from None


def collate(samples):
    """Targets as class ids (lists: concatenated, with their lengths) or as arrays of one shape
    (a teacher's per-step probabilities: stacked)."""
    images, targets, labels, keys = zip(*samples)
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    if isinstance(targets[0], np.ndarray):
        stacked = torch.from_numpy(np.stack(targets))
    else:
        stacked = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    return torch.from_numpy(np.stack(images)), stacked, lengths, list(labels), list(keys)


def loader_workers(n_shards: int, world_size: int, workers: int, split: str, every_rank: bool = True) -> int:
    """Loader workers per rank, capped so that none sits without a shard.

    Training needs a shard on every rank (`every_rank`): a rank without data would leave the
    others waiting in their gradient all-reduce. Evaluation sums counts, so idle ranks are fine.
    """
    if every_rank and n_shards < world_size:
        raise PipelineError(
            f"split {split!r} has {n_shards} shard(s) for {world_size} ranks: each rank needs at "
            f"least one; write more, smaller shards (data.shard_size)")
    return min(workers, n_shards // world_size)


def make_loader(stream: ShardStream, workers: int, pin_memory: bool = False):
    # A generator of its own: a DataLoader otherwise draws its workers' base seed from torch's global
    # random state at each new iterator, which shifts dropout's masks by whether the workers were
    # started in this process or before a resume. The stream seeds its own randomness (derive_seed).
    return torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        multiprocessing_context="fork" if workers > 0 else None,
        generator=torch.Generator().manual_seed(stream.seed),
    )
