"""Self-training: the model's readings of unlabelled captchas become labels where it is confident
enough that, on the labelled val split, readings that confident are right at least `precision` of
the time (train.pseudo_rounds, train.pseudo_precision)."""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.data.shards import Sample, iter_tar, write_shard


def confidence_threshold(readings: list[tuple[str, str, float]], precision: float) -> float:
    """The lowest confidence t such that the (truth, reading, confidence) triples with confidence
    >= t are right at least `precision` of the time; inf when no such t exists."""
    ranked = sorted(readings, key=lambda r: -r[2])
    threshold, right = math.inf, 0
    for i, (truth, reading, confidence) in enumerate(ranked, 1):
        right += truth == reading
        # ties: every reading of this confidence is kept with it, so judge at the last of them
        if right / i >= precision and (i == len(ranked) or ranked[i][2] < confidence):
            threshold = confidence
    return threshold


def write_pseudo_shard(unlabelled_shards: list[str], labels: dict[str, str], path: Path) -> int:
    """Write the unlabelled samples that `labels` (key -> reading) names, labelled, as one shard;
    return how many."""
    count = 0

    def samples():
        nonlocal count
        for shard in unlabelled_shards:
            for sample in iter_tar(Path(shard)):
                if sample["__key__"] in labels:
                    count += 1
                    yield Sample(sample["__key__"], sample["png"], labels[sample["__key__"]], {"source": "pseudo"})

    write_shard(path, samples())
    return count
