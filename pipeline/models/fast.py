"""The CPU-efficient default: grayscale, low resolution, narrow early convs, small BiGRU.

Six 3x3 convs in four blocks; the first two blocks halve both axes, the last two only the
height, so a 32x96 input gives 24 steps of (2 rows x c4 channels) features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.models.layers import InputSettings, SequenceHead, conv_bn_relu


@dataclass(frozen=True)
class Settings(InputSettings):
    height: int = 32
    width: int = 96
    channels: int = 1
    conv: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    hidden: int = 128
    rnn_layers: int = 2
    dropout: float = 0.1


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
