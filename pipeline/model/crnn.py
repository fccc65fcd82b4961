"""The CRNN of the tutorial this project started from: VGG-style 7-conv CNN (64..512, BatchNorm on
the later layers) + 2 BiLSTM."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import require
from pipeline.model.layers import InputSettings, conv_bn_relu


@dataclass(frozen=True)
class Settings(InputSettings):
    hidden: int

    def check(self, prefix: str) -> None:
        super().check(prefix)
        require(self.height == 32, f"{prefix}.height", f"the CRNN's pooling needs 32 px high input, got {self.height}")
        require(self.width >= 16, f"{prefix}.width", f"must be at least 16, got {self.width}")
        require(0 < self.hidden <= 4096, f"{prefix}.hidden", f"must be from 1 to 4096, got {self.hidden}")


class CRNN(nn.Module):
    def __init__(self, s: Settings, num_classes: int, max_length: int):
        super().__init__()
        self.cnn = nn.Sequential(
            *conv_bn_relu(s.channels, 64, bn=False), nn.MaxPool2d(2, 2),
            *conv_bn_relu(64, 128, bn=False), nn.MaxPool2d(2, 2),
            *conv_bn_relu(128, 256, bn=False), *conv_bn_relu(256, 256, bn=False), nn.MaxPool2d((2, 1), (2, 1)),
            *conv_bn_relu(256, 512), *conv_bn_relu(512, 512), nn.MaxPool2d((2, 1), (2, 1)),
            *conv_bn_relu(512, 512, kernel=2, padding=0),  # height 2 -> 1
        )
        self.rnn1 = nn.LSTM(512, s.hidden, bidirectional=True, batch_first=True)
        self.proj1 = nn.Linear(2 * s.hidden, s.hidden)
        self.rnn2 = nn.LSTM(s.hidden, s.hidden, bidirectional=True, batch_first=True)
        self.classifier = nn.Linear(2 * s.hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = self.cnn(x).squeeze(2).transpose(1, 2)  # (B, W, 512)
        seq = self.proj1(self.rnn1(seq)[0])
        return self.classifier(self.rnn2(seq)[0])
