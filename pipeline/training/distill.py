"""Soft targets from a teacher (train.distill): the `soft` split of the sources (written by the teach
stage with teach.soft) holds unlabelled captchas with the teacher's per-step probabilities. At every
step, beside the labelled batch, a batch of them is read and the student's per-step distributions
are pulled toward the teacher's (KL divergence, weighted by train.distill).

Teacher and student may read a captcha in different numbers of steps: the teacher's steps are
resampled to the student's by linear interpolation along the width. Both models read the image from
its left edge at a fixed number of columns per step and pad on the right, so step i of T covers the
same fraction of the width in either when both keep the aspect ratio with the same maximum aspect
(the ddddocr trunk at 64 x 192 and `fast` at 32 x 96 both read 24 steps: then the interpolation is
the identity). The student reads each captcha unaugmented, as the teacher did: a warped or shifted
image would no longer line up with the teacher's steps.
"""
from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.stream import ShardStream, make_loader
from pipeline.device import autocast
from pipeline.errors import ParamsError
from pipeline.params import TrainParams


def check_distill(world: int, soft_shards: list[str]) -> None:
    if not soft_shards:
        raise ParamsError("train.distill: the sources hold no soft targets (run teach with teach.soft: true, and "
                          "name data/teacher/manifest.parquet in train.sources)")
    if world > 1:
        raise ParamsError("train.distill: runs in one process (not under torchrun)")


def resample_steps(probs: np.ndarray, steps: int) -> np.ndarray:
    """(T, C) per-step probabilities -> (steps, C), linearly interpolated along the steps."""
    if len(probs) == steps:
        return probs
    position = (np.arange(steps) + 0.5) * len(probs) / steps - 0.5  # step centres in the teacher's steps
    position = np.clip(position, 0, len(probs) - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, len(probs) - 1)
    weight = (position - low)[:, None]
    out = probs[low] * (1 - weight) + probs[high] * weight
    return out / out.sum(-1, keepdims=True)


class SoftTargets:
    def __init__(self, tp: TrainParams, soft_shards: list[str], preprocess, steps: int, workers: int):
        self.weight = tp.distill
        self.read = 0

        def with_targets(png, label, augment_rng, npy):
            probs = np.load(io.BytesIO(npy), allow_pickle=False).astype(np.float32)
            return preprocess(png), resample_steps(probs, steps)

        self.stream = ShardStream(soft_shards, with_targets, tp.batch_size, shuffle=True,
                                  shuffle_buffer=tp.shuffle_buffer, seed=tp.seed + 2, members=("npy",))
        self.loader = make_loader(self.stream, min(workers, len(soft_shards)))
        self.batches = None
        self.epoch = 0

    def next_batch(self):
        while True:
            if self.batches is None:
                self.stream.set_epoch(self.epoch)
                self.batches = iter(self.loader)
            try:
                images, targets, *_ = next(self.batches)
                return images, targets
            except StopIteration:
                self.batches, self.epoch = None, self.epoch + 1

    def loss(self, net: nn.Module, device: torch.device, precision: str) -> torch.Tensor:
        """The weighted KL divergence of the student's per-step distributions from the teacher's."""
        images, targets = self.next_batch()
        with autocast(device, precision):
            logits = net(images.to(device, memory_format=torch.channels_last))
        self.read += len(images)
        log_probs = logits.float().log_softmax(-1)
        return self.weight * F.kl_div(log_probs, targets.to(device), reduction="batchmean") / log_probs.shape[1]
