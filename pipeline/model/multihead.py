"""The reference project's CNN baseline: the same conv trunk, flatten, one softmax head per position.

Each head has the charset's classes plus class 0, "no character", so labels shorter than
data.max_length are predicted as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import require
from pipeline.model.ctc_conv import CHANNELS, reference_trunk
from pipeline.model.layers import InputSettings, check_dropout


@dataclass(frozen=True)
class Settings(InputSettings):
    dropout: float

    def check(self, prefix: str) -> None:
        super().check(prefix)
        for name in ("height", "width"):
            value = getattr(self, name)
            require(value >= 32, f"{prefix}.{name}", f"must be at least 32 (five poolings), got {value}")
        check_dropout(self.dropout, f"{prefix}.dropout")


class MultiHead(nn.Module):
    def __init__(self, s: Settings, num_classes: int, max_length: int):
        super().__init__()
        self.cnn = reference_trunk(s.channels, [2, 2, 2, 2, 2])
        features = CHANNELS[-1] * (s.height // 32) * (s.width // 32)
        self.dropout = nn.Dropout(s.dropout)
        self.heads = nn.Linear(features, max_length * num_classes)
        self.max_length, self.num_classes = max_length, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.dropout(self.cnn(x).flatten(1))
        return self.heads(flat).view(-1, self.max_length, self.num_classes)
