"""The data a model trains and is scored on: `train.sources` maps manifests to how many times
their training shards repeat per epoch. train, evaluate and export all resolve it here."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.data.shards import read_manifest, split_shards
from pipeline.errors import DataError, PipelineError


@dataclass(frozen=True)
class Source:
    manifest: str
    repeats: int
    table: pa.Table

    @cached_property  # evaluate asks once per test key
    def name(self) -> str:
        """The manifest's `source` column when it holds one value (synthetic, ingest), else its path."""
        values = pc.unique(self.table["source"]).to_pylist() if "source" in self.table.column_names else []
        return values[0] if len(values) == 1 else self.manifest

    def keys(self, split: str) -> list[str]:
        return self.table.filter(pc.equal(self.table["split"], split))["key"].to_pylist()


def load_sources(sources: dict[str, int]) -> list[Source]:
    loaded = [Source(manifest, repeats, read_manifest(Path(manifest))) for manifest, repeats in sources.items()]
    for source in loaded:
        check_manifest(source)
    return loaded


def check_manifest(source: Source) -> None:
    """Every row a sample of its own, in a shard that exists: an edited or stale manifest stops here."""
    table = source.table
    if table.num_rows == 0:
        return
    for columns, what in ((["key"], "key"), (["shard", "offset"], "shard position")):
        counts = table.group_by(columns).aggregate([([], "count_all")])
        twice = counts.filter(pc.greater(counts["count_all"], 1))
        if twice.num_rows:
            example = ", ".join(str(twice[c][0].as_py()) for c in columns)
            raise DataError(f"{source.manifest}: {twice.num_rows} {what}s listed more than once (e.g. {example}); "
                            f"rebuild the manifest (generate --manifest-only, or ingest)")
    missing = [s for s in pc.unique(table["shard"]).to_pylist() if not Path(s).is_file()]
    if missing:
        raise DataError(f"{missing[0]}: shard listed in {source.manifest} not found"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))


def shards_of(sources: list[Source], split: str) -> list[tuple[str, int]]:
    """(shard, samples) of a split over all sources; training repeats each source's shards."""
    shards = []
    for source in sources:
        shards += split_shards(source.table, split) * (source.repeats if split == "train" else 1)
    return shards


def require_shards(sources: list[Source], split: str, stage: str) -> list[tuple[str, int]]:
    shards = shards_of(sources, split)
    if not shards:
        raise PipelineError(f"{stage}: no {split} samples in {', '.join(s.manifest for s in sources)}")
    return shards
