"""The second seed's CNN baseline: the same conv trunk, flatten, one softmax head per position.

Each head has the charset's classes plus class 0, "no character", so labels shorter than
data.max_length are predicted as well.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.ctc_conv import CHANNELS, seed_trunk
from pipeline.models.layers import InputSettings


@dataclass(frozen=True)
class Settings(InputSettings):
    height: int = 64
    width: int = 128
    channels: int = 3
    dropout: float = 0.2


class MultiHead(nn.Module):
    def __init__(self, s: Settings, num_classes: int, max_length: int):
        super().__init__()
        self.cnn = seed_trunk(s.channels, [2, 2, 2, 2, 2])
        features = CHANNELS[-1] * (s.height // 32) * (s.width // 32)
        self.dropout = nn.Dropout(s.dropout)
        self.heads = nn.Linear(features, max_length * num_classes)
        self.max_length, self.num_classes = max_length, num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.dropout(self.cnn(x).flatten(1))
        return self.heads(flat).view(-1, self.max_length, self.num_classes)
