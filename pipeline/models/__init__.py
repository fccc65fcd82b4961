"""Model registry: `model.arch` -> (settings dataclass, builder).

Every model maps a (batch, channels, height, width) float tensor to (batch, steps, classes)
logits. CTC models decode with repeats collapsed; the fixed-length `multihead` model has one
step per character position and class 0 meaning "no character here".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from pipeline.models import crnn, ctc_conv, fast, multihead


@dataclass(frozen=True)
class Arch:
    Settings: type
    build: Callable[..., nn.Module]  # build(settings, num_classes, max_length)
    ctc: bool = True


ARCHS = {
    "fast": Arch(fast.Settings, fast.FastCRNN),
    "crnn": Arch(crnn.Settings, crnn.CRNN),
    "ctc_gru": Arch(ctc_conv.GRUSettings, ctc_conv.ConvRNN),
    "ctc_lstm": Arch(ctc_conv.LSTMSettings, ctc_conv.ConvRNN),
    "multihead": Arch(multihead.Settings, multihead.MultiHead, ctc=False),
}


def build_model(arch: str, settings: dict, num_classes: int, max_length: int) -> nn.Module:
    spec = ARCHS[arch]
    return spec.build(spec.Settings(**settings), num_classes, max_length)
