"""Running a model: the one forward pass (`model_logits`), probabilities, decoded text."""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from pipeline.charset import Charset, fold_text
from pipeline.device import autocast
from pipeline.read.decode import decode

CPU = torch.device("cpu")


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@torch.inference_mode()
def model_logits(model: nn.Module, images, device: torch.device = CPU, precision: str = "fp32") -> np.ndarray:
    """(B, C, H, W) preprocessed inputs (tensor or array) -> (B, T, classes) float32 logits."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    with autocast(device, precision):
        logits = model(images.to(device, non_blocking=True))
    return logits.float().cpu().numpy()


def model_probs(model: nn.Module, images, device: torch.device = CPU, precision: str = "fp32") -> np.ndarray:
    """(B, C, H, W) preprocessed inputs -> (B, T, classes) probabilities."""
    return softmax(model_logits(model, images, device, precision))


def decode_texts(probs: np.ndarray, charset: Charset, ctc: bool, beam: int = 1,
                 allowed: str | None = None, case: str | None = None) -> list[tuple[str, float]]:
    """Texts and confidences; `allowed` keeps only those characters, `case` ("upper", "lower")
    reads letters case-insensitively and answers in that case."""
    mask = charset.mask(allowed)
    if mask is not None:
        probs = probs * mask
        probs = probs / probs.sum(-1, keepdims=True)
    probs = charset.fold_case(probs, case)
    # a model that answers NaN for some image (models that do for a blank one are never loaded) is
    # trusted with nothing there: confidence 0, never a NaN in the JSON of predict or serve
    finite = np.isfinite(probs).all(axis=(1, 2))
    texts = [(charset.decode(ids), conf) for ids, conf in decode(probs, beam, collapse_repeats=ctc)]
    return [(fold_text(text, case), conf if ok and math.isfinite(conf) else 0.0)
            for (text, conf), ok in zip(texts, finite)]


def predict_batches(model: nn.Module, batches: Iterable, device: torch.device, precision: str,
                    charset: Charset, ctc: bool) -> Iterator[tuple[str, str, float, str]]:
    """Stream (truth, prediction, confidence, key) over loader batches."""
    model.eval()
    for images, _targets, _lengths, labels, keys in batches:
        probs = model_probs(model, images, device, precision)
        for (text, conf), label, key in zip(decode_texts(probs, charset, ctc), labels, keys):
            yield label, text, conf, key
