"""The data a model trains and is scored on: `train.sources` maps manifests to how many times
their training shards repeat per epoch. train, evaluate and export all resolve it here."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import PipelineError
from pipeline.shards import read_manifest, split_shards


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
    return [Source(manifest, repeats, read_manifest(Path(manifest))) for manifest, repeats in sources.items()]


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
