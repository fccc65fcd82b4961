"""Running a model over batches: probabilities out, decoded text and confidence."""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.charset import Charset, decode
from pipeline.device import autocast


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@torch.no_grad()
def forward_probs(model: nn.Module, images: torch.Tensor, device: torch.device, precision: str) -> np.ndarray:
    """(B, C, H, W) inputs -> (B, T, classes) float32 probabilities."""
    with autocast(device, precision):
        logits = model(images.to(device, non_blocking=True))
    return logits.float().softmax(-1).cpu().numpy()


def decode_texts(probs: np.ndarray, charset: Charset, ctc: bool, beam: int = 1,
                 allowed: str | None = None) -> list[tuple[str, float]]:
    mask = charset.mask(allowed)
    if mask is not None:
        probs = probs * mask
        probs = probs / probs.sum(-1, keepdims=True)
    return [(charset.decode(ids), conf) for ids, conf in decode(probs, beam, collapse_repeats=ctc)]


def predict_batches(model: nn.Module, batches: Iterable, device: torch.device, precision: str,
                    charset: Charset, ctc: bool) -> Iterator[tuple[str, str, float, str]]:
    """Stream (truth, prediction, confidence, key) over loader batches."""
    model.eval()
    for images, _targets, _lengths, labels, keys in batches:
        probs = forward_probs(model, images, device, precision)
        for (text, conf), label, key in zip(decode_texts(probs, charset, ctc), labels, keys):
            yield label, text, conf, key
