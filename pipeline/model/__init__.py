"""Model registry: `model.arch` -> (settings dataclass, builder).

Every model maps a (batch, channels, height, width) float tensor to (batch, steps, classes)
logits. CTC models decode with repeats collapsed; the fixed-length `multihead` model has one
step per character position and class 0 meaning "no character here".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pipeline.model import crnn, ctc_conv, ddddocr, fast, multihead


@dataclass(frozen=True)
class Arch:
    Settings: type  # a frozen dataclass with check(prefix), validated when params load
    build: Callable[..., nn.Module]  # build(settings, num_classes, max_length)
    ctc: bool = True


ARCHS = {
    "fast": Arch(fast.Settings, fast.FastCRNN),
    "crnn": Arch(crnn.Settings, crnn.CRNN),
    "ctc_gru": Arch(ctc_conv.Settings, ctc_conv.gru),
    "ctc_lstm": Arch(ctc_conv.Settings, ctc_conv.lstm),
    "multihead": Arch(multihead.Settings, multihead.MultiHead, ctc=False),
    "ddddocr": Arch(ddddocr.Settings, ddddocr.DdddOcrNet),
}


def build_model(arch: str, settings, num_classes: int, max_length: int) -> nn.Module:
    """`settings`: the arch's Settings, or a mapping of its fields (as a checkpoint stores them)."""
    spec = ARCHS[arch]
    if not isinstance(settings, spec.Settings):
        settings = spec.Settings(**settings)
    return spec.build(settings, num_classes, max_length)


def output_steps(arch: str, settings, max_length: int) -> int:
    """Time steps of the model's output, from one blank image, on the CPU with random weights (the
    meta device needs no weights but took 0.4 to 2 s for `fast`'s GRU, against 0.02 s here).
    torch's random state is restored, so this changes no later initialisation."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        model = build_model(arch, settings, 2, max_length).eval()
        return model(torch.zeros(1, settings.channels, settings.height, settings.width)).shape[1]


def steps_needed(arch: str, max_length: int) -> int:
    """CTC needs a blank between repeated characters: 2 * max_length - 1 steps; fixed heads need one per position."""
    return 2 * max_length - 1 if ARCHS[arch].ctc else max_length
