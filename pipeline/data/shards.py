"""WebDataset shards and the Parquet manifest: writing and scanning them (the data stages), with no
torch (pipeline/data/stream.py streams them to training).

A shard is a plain tar of samples `<key>.png`, `<key>.txt` (label) and `<key>.json` (metadata),
written under a temporary name and renamed when complete. The manifest is always rebuilt by
scanning the shards, so it can never disagree with them.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import struct
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from pipeline.files import atomic_write, folder_lock

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"  # ingest.unlabelled: images without a label, for self-training only
SOFT = "soft"  # teach.soft: unlabelled images with a teacher's per-step probabilities (`.npy`), for train.distill


def shard_path(root: Path, split: str, index: int) -> Path:
    return Path(root) / split / f"{split}-{index:06d}.tar"


@dataclass(frozen=True)
class Sample:
    key: str
    png: bytes
    label: str
    meta: dict
    extra: dict = field(default_factory=dict)  # more members, extension -> bytes (e.g. npy: a teacher's readings)


def write_shard(path: Path, samples: Iterable[Sample]) -> None:
    """Write samples as a WebDataset tar with fixed headers, so equal samples give equal bytes:
    members `<key>.json`, `.png`, `.txt` and any extra ones, by extension in alphabetical order,
    each mode 0444, mtime 0, no owner names (the bytes webdataset's TarWriter writes, without
    importing it: it imports torch)."""

    def write(f):
        with tarfile.open(fileobj=f, mode="w|") as tar:
            for s in samples:
                meta = json.dumps(s.meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
                members = {"json": meta, "png": s.png, "txt": s.label.encode("utf-8"), **s.extra}
                for ext, data in sorted(members.items()):
                    info = tarfile.TarInfo(f"{s.key}.{ext}")
                    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "", ""
                    tar.addfile(info, io.BytesIO(data))

    atomic_write(path, write)


def write_dataset(out: Path, splits: dict[str, list], shard_size: int, to_sample: Callable[[object], Sample]) -> None:
    """`out`/shards/<split>/*.tar and `out`/manifest.parquet, written in a folder of their own beside
    `out` and swapped in whole once complete, under `out`'s lock: whatever fails before (a full
    disk, a kill), the previous dataset stays as it was, and two writers never interleave. Items
    become samples (`to_sample`) as their shard is written."""
    import shutil

    with folder_lock(out, exclusive=True):
        for stale in out.parent.glob(f".{out.name}.new-*"):  # left by killed runs: none can be running
            shutil.rmtree(stale, ignore_errors=True)
        staging = out.parent / f".{out.name}.new-{os.getpid()}"
        try:
            jobs = []
            for split, items in splits.items():
                for index, start in enumerate(range(0, len(items), shard_size)):
                    path = shard_path(staging / "shards", split, index)
                    write_shard(path, (to_sample(item) for item in items[start:start + shard_size]))
                    jobs.append((str(path), split))
            rows = scan_shards(jobs, workers=1)
            for row in rows:  # the manifest names the shards where they will be
                row["shard"] = str(out / Path(row["shard"]).relative_to(staging))
            write_manifest(rows, staging / "manifest.parquet")
            if out.exists():
                old = out.parent / f".{out.name}.new-{os.getpid()}-old"
                os.replace(out, old)
                os.replace(staging, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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
