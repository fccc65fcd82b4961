"""WebDataset shards and the Parquet manifest: writing, scanning, and streaming for training.

A shard is a plain tar of samples `<key>.png`, `<key>.txt` (label) and `<key>.json` (metadata),
written under a temporary name and renamed when complete. The manifest is always rebuilt by
scanning the shards, so it can never disagree with them.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import random
import struct
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from pipeline.data.seeds import derive_seed
from pipeline.errors import DataError, PipelineError
from pipeline.files import atomic_write

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # ingest.unlabelled: images without a label, for self-training only


def shard_path(root: Path, split: str, index: int) -> Path:
    return Path(root) / split / f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class Sample:
    key: str
    png: bytes
    label: str
    meta: dict


def write_shard(path: Path, samples: Iterable[Sample]) -> None:
    """Write samples as a WebDataset tar with fixed headers, so equal samples give equal bytes."""

    def write(f):
        with wds.TarWriter(f, user="", group="", mode=0o444, mtime=0, encoder=False) as tar:
            for s in samples:
                meta = json.dumps(s.meta, sort_keys=True, separators=(",", ":"))
                tar.write({"__key__": s.key, "png": s.png, "txt": s.label.encode("utf-8"),
                           "json": meta.encode("utf-8")})

    atomic_write(path, write)


def png_size(png: bytes) -> tuple[int, int]:
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def iter_tar(path: Path) -> Iterator[dict]:
    """Group a shard's members by key, in file order: {'__key__', 'png', 'txt', 'json'}."""
    current: dict = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext] = tar.extractfile(member).read()
    if current:
        yield current


def scan_shard(path: Path, split: str, root: Path = Path(".")) -> list[dict]:
    """Manifest rows for one shard, read from its contents."""
    rows = []
    for offset, sample in enumerate(iter_tar(root / path)):
        png, label = sample["png"], sample["txt"].decode("utf-8")
        width, height = png_size(png)
        meta = json.loads(sample.get("json", b"{}"))
        rows.append({
            "key": sample["__key__"], "split": split, "shard": str(path), "offset": offset,
            "label": label, "length": len(label), "width": width, "height": height,
            "sha256": hashlib.sha256(png).hexdigest(), **meta,
        })
    return rows


MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("split", pa.string()), ("shard", pa.string()), ("offset", pa.int64()),
    ("label", pa.string()), ("length", pa.int64()), ("width", pa.int64()), ("height", pa.int64()),
    ("sha256", pa.string()), ("source", pa.string()),
])


def write_manifest(rows: list[dict], path: Path) -> pa.Table:
    """Rows in order; the base columns first, then any metadata columns the samples carry."""
    table = pa.Table.from_pylist(rows) if rows else MANIFEST_SCHEMA.empty_table()
    extra = [c for c in table.column_names if c not in MANIFEST_SCHEMA.names]
    table = table.select(MANIFEST_SCHEMA.names + extra)
    atomic_write(path, lambda f: pq.write_table(table, f, compression="zstd"))
    return table


def read_manifest(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise PipelineError(f"{path}: cannot read manifest ({e}); run the stage that writes it") from None


def split_shards(manifest: pa.Table, split: str) -> list[tuple[str, int]]:
    """[(shard path, sample count)] of one split, in shard order."""
    shards = manifest.filter(pa.compute.equal(manifest["split"], split))["shard"].to_pylist()
    return sorted(Counter(shards).items())


def scan_shards(jobs: list[tuple[str, str]], workers: int, root: Path = Path(".")) -> list[dict]:
    """Scan (shard path, split) pairs, in parallel, rows in job order."""
    if workers <= 1 or len(jobs) <= 1:
        return [r for path, split in jobs for r in scan_shard(Path(path), split, root)]
    with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        parts = pool.starmap(scan_shard, [(Path(p), s, root) for p, s in jobs])
    return [r for part in parts for r in part]


# ---------------------------------------------------------------------------------------------
# streaming


class ShardStream(IterableDataset):
    """Batches streamed from WebDataset shards.

    Shards are split across distributed ranks, then across loader workers, so each sample is
    read by exactly one worker of one rank per epoch. Training streams shuffle the shard order
    per epoch and samples through a buffer, both seeded by (seed, epoch, rank, worker); each
    sample's augmentation draws from its own stream, seeded by (seed, epoch, key). The epoch is
    shared memory so that persistent workers see `set_epoch`.

    `transform(png_bytes, label, augment_rng)` runs in the workers and returns (image array, target ids);
    batches are (images, targets, target_lengths, labels, keys).
    """

    def __init__(self, shards: list[str], transform, batch_size: int, shuffle: bool = False,
                 shuffle_buffer: int = 2000, seed: int = 0):
        self.shards = list(shards)
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
                return (*self.transform(sample["png"], label, augment_rng), label, key)
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
    images, targets, labels, keys = zip(*samples)
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
    flat = torch.tensor([i for t in targets for i in t], dtype=torch.long)
    return torch.from_numpy(np.stack(images)), flat, lengths, list(labels), list(keys)


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
