"""Self-training (train.pseudo_rounds): after each of the rounds, spread evenly over the run, the
model reads the unlabelled samples, and the readings confident enough that, on the labelled val
split, readings that confident are right at least train.pseudo_precision of the time join the
training set as labels."""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.data.shards import Sample, iter_tar, write_shard
from pipeline.data.stream import ShardStream, make_loader
from pipeline.errors import ParamsError
from pipeline.params import TrainParams
from pipeline.read.inference import predict_batches
from pipeline.read.metrics import confidence_threshold, finite_or_none


def check_self_training(tp: TrainParams, world: int, val_shards: list, unlabelled_shards: list[str]) -> None:
    if not unlabelled_shards:
        raise ParamsError("train.pseudo_rounds: the sources hold no unlabelled samples (ingest them with "
                          "ingest.unlabelled: true)")
    if not val_shards:
        raise ParamsError("train.pseudo_rounds: needs a val split to choose the confidence threshold on")
    if world > 1 or tp.resume:
        raise ParamsError("train.pseudo_rounds: runs in one process and from the start (not under torchrun, "
                          "not with train.resume)")


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


class SelfTraining:
    """The rounds of one run: when each is due, and what each adds."""

    def __init__(self, tp: TrainParams, unlabelled_shards: list[str], folder: Path):
        self.tp = tp
        self.unlabelled_shards = unlabelled_shards
        self.folder = folder
        self.rounds: list[dict] = []

    def due(self, epochs_done: int, seconds: float) -> bool:
        """Round k of n is due once the run is k/(n+1) of the way through its epochs or its time budget,
        unless the budget left is under twice what the last round took: too little to train on it."""
        tp = self.tp
        if len(self.rounds) >= tp.pseudo_rounds or epochs_done >= tp.epochs:
            return False
        done = epochs_done / tp.epochs
        if tp.max_minutes:
            done = max(done, seconds / (tp.max_minutes * 60))
            left = tp.max_minutes * 60 - seconds
            if self.rounds and left < 2 * self.rounds[-1]["seconds"]:
                return False
        return done >= (len(self.rounds) + 1) / (tp.pseudo_rounds + 1)

    def round(self, model, val_readings: list[tuple[str, str, float]], transform, device, precision: str,
              charset, ctc: bool, epochs_done: int) -> tuple[Path | None, dict]:
        """Read the unlabelled samples; return the shard of the confident readings (None if there are
        none) and the round's record. Its pseudo-labels replace the last round's."""
        started = time.perf_counter()
        threshold = confidence_threshold(val_readings, self.tp.pseudo_precision)
        stream = ShardStream(self.unlabelled_shards, transform, 256)
        labels, total = {}, 0
        for _truth, text, conf, key in predict_batches(model, make_loader(stream, 0), device, precision, charset, ctc):
            total += 1
            if text and conf >= threshold:
                labels[key] = text
        shard = self.folder / f"pseudo-{len(self.rounds):02d}.tar"
        kept = write_pseudo_shard(self.unlabelled_shards, labels, shard) if labels else 0
        record = {"round": len(self.rounds) + 1, "after_epoch": epochs_done, "threshold": finite_or_none(threshold),
                  "pseudo_labels": kept, "unlabelled": total, "seconds": round(time.perf_counter() - started, 1)}
        self.rounds.append(record)
        return (shard if kept else None), record
