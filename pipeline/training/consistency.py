"""Consistency training on unlabelled captchas (train.consistency), FixMatch-style.

At every step, beside the labelled batch, a batch of the sources' unlabelled captchas is read in
two views: a weak one (a small crop and shift) and a strong one (every distortion of
pipeline/training/augment.py). The model reads the weak view without gradients; where its reading
is confident enough, the reading becomes the target of the strong view, whose loss (weighted by
train.consistency, averaged over the whole unlabelled batch) joins the labelled loss. "Confident
enough" is chosen on the labelled val split after each epoch, as self-training chooses it: the
lowest confidence at which val readings are right train.pseudo_precision of the time; until the
first val there is none, and the unlabelled batches wait.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import nn

from pipeline.charset import Charset
from pipeline.data.stream import ShardStream, make_loader
from pipeline.device import autocast
from pipeline.errors import ParamsError
from pipeline.params import TrainParams
from pipeline.read.inference import decode_texts, softmax
from pipeline.read.metrics import confidence_threshold
from pipeline.training.augment import DISTORTIONS, Augment
from pipeline.training.losses import sequence_loss

WEAK = Augment(1.0, ("crop",))
STRONG = Augment(1.0, DISTORTIONS)


def check_consistency(tp: TrainParams, world: int, val_shards: list, unlabelled_shards: list[str]) -> None:
    if not unlabelled_shards:
        raise ParamsError("train.consistency: the sources hold no unlabelled samples (ingest them with "
                          "ingest.unlabelled: true)")
    if not val_shards:
        raise ParamsError("train.consistency: needs a val split to choose the confidence threshold on")
    if world > 1:
        raise ParamsError("train.consistency: runs in one process (not under torchrun)")


class Consistency:
    def __init__(self, tp: TrainParams, unlabelled_shards: list[str], preprocess, charset: Charset, ctc: bool,
                 workers: int):
        self.weight = tp.consistency
        self.precision_wanted = tp.pseudo_precision
        self.charset = charset
        self.ctc = ctc
        self.threshold = math.inf
        self.seen = self.used = 0  # unlabelled images read, and those whose reading became a target

        def two_views(png, label, augment_rng):
            weak_rng = random.Random(augment_rng.getrandbits(64))
            return np.stack([preprocess(png, WEAK.draw(weak_rng)), preprocess(png, STRONG.draw(augment_rng))]), []

        self.stream = ShardStream(unlabelled_shards, two_views, tp.batch_size, shuffle=True,
                                  shuffle_buffer=tp.shuffle_buffer, seed=tp.seed + 1)
        self.loader = make_loader(self.stream, min(workers, len(unlabelled_shards)))
        self.batches = None
        self.epoch = 0

    def choose_threshold(self, val_readings: list[tuple[str, str, float]]) -> None:
        self.threshold = confidence_threshold(val_readings, self.precision_wanted)

    def next_views(self) -> torch.Tensor:
        """(batch, 2, C, H, W): the next unlabelled batch, weak and strong; the stream restarts
        (reshuffled) when it runs out."""
        while True:
            if self.batches is None:
                self.stream.set_epoch(self.epoch)
                self.batches = iter(self.loader)
            try:
                return next(self.batches)[0]
            except StopIteration:
                self.batches, self.epoch = None, self.epoch + 1

    def loss(self, net: nn.Module, model: nn.Module, device: torch.device, precision: str) -> torch.Tensor | None:
        """The weighted loss of the strong views on the confident weak readings; None before the
        first threshold, or when no reading is confident enough."""
        if math.isinf(self.threshold):
            return None
        views = self.next_views()
        weak, strong = views[:, 0], views[:, 1]
        was_training = model.training
        model.eval()  # the reading as val reads it: dropout off, batch norm's running statistics
        with torch.no_grad(), autocast(device, precision):
            logits = model(weak.to(device, memory_format=torch.channels_last))
        model.train(was_training)
        readings = decode_texts(softmax(logits.float().cpu().numpy()), self.charset, self.ctc)
        keep = [i for i, (text, conf) in enumerate(readings) if text and conf >= self.threshold]
        self.seen += len(readings)
        self.used += len(keep)
        if not keep:
            return None
        targets = [self.charset.encode(readings[i][0]) for i in keep]
        flat = torch.tensor([c for t in targets for c in t], dtype=torch.long, device=device)
        lengths = torch.tensor([len(t) for t in targets], dtype=torch.long)
        with autocast(device, precision):
            strong_logits = net(strong[keep].to(device, memory_format=torch.channels_last))
        loss = sequence_loss(strong_logits, flat, lengths, self.ctc)
        return self.weight * loss * (len(keep) / len(readings))
