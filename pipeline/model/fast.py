"""The CPU-efficient default: grayscale, low resolution, narrow early convs, small BiGRU.

Six 3x3 convs in four blocks; the first two blocks halve both axes, the last two only the
height, so a 32x96 input gives 24 steps of (2 rows x c4 channels) features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import require
from pipeline.model.layers import InputSettings, SequenceHead, check_dropout, conv_bn_relu


@dataclass(frozen=True)
class Settings(InputSettings):
    conv: list[int]  # channels of the four conv blocks
    hidden: int
    rnn_layers: int
    dropout: float

    def check(self, prefix: str) -> None:
        super().check(prefix)
        require(self.height >= 16, f"{prefix}.height", f"must be at least 16 (four poolings), got {self.height}")
        require(len(self.conv) == 4 and all(0 < c <= 4096 for c in self.conv), f"{prefix}.conv",
                f"expected 4 positive channel counts, got {self.conv}")
        require(0 < self.hidden <= 4096, f"{prefix}.hidden", f"must be from 1 to 4096, got {self.hidden}")
        require(self.rnn_layers > 0, f"{prefix}.rnn_layers", f"must be positive, got {self.rnn_layers}")
        check_dropout(self.dropout, f"{prefix}.dropout")


class FastCRNN(nn.Module):
    def __init__(self, s: Settings, num_classes: int, max_length: int):
        super().__init__()
        c1, c2, c3, c4 = s.conv
        self.cnn = nn.Sequential(
            *conv_bn_relu(s.channels, c1), nn.MaxPool2d(2),
            *conv_bn_relu(c1, c2), nn.MaxPool2d(2),
            *conv_bn_relu(c2, c3), *conv_bn_relu(c3, c3), nn.MaxPool2d((2, 1)),
            *conv_bn_relu(c3, c4), *conv_bn_relu(c4, c4), nn.MaxPool2d((2, 1)),
        )
        self.dropout = nn.Dropout(s.dropout)
        self.head = SequenceHead(c4 * (s.height // 16), s.hidden, s.rnn_layers, num_classes,
                                 dropout=s.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.cnn(x)))
