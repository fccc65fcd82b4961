"""The CTC models of the reference captcha-breaking project: 5 blocks of 2x(conv3x3+BN+ReLU),
pooling 2,2,2,(2,1),(2,1), height flattened into features, 2 bidirectional GRU (its Keras version)
or LSTM (its PyTorch version)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import require
from pipeline.model.layers import InputSettings, SequenceHead, conv_bn_relu

CHANNELS = (32, 64, 128, 256, 256)


def reference_trunk(in_channels: int, pools) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out, pool in zip(CHANNELS, pools):
        layers += conv_bn_relu(c_in, c_out) + conv_bn_relu(c_out, c_out) + [nn.MaxPool2d(pool)]
        c_in = c_out
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class Settings(InputSettings):
    hidden: int

    def check(self, prefix: str) -> None:
        super().check(prefix)
        require(self.height >= 32, f"{prefix}.height", f"must be at least 32 (five poolings), got {self.height}")
        require(self.width >= 8, f"{prefix}.width", f"must be at least 8, got {self.width}")
        require(0 < self.hidden <= 4096, f"{prefix}.hidden", f"must be from 1 to 4096, got {self.hidden}")


class ConvRNN(nn.Module):
    def __init__(self, s: Settings, num_classes: int, max_length: int, cell: str = "gru"):
        super().__init__()
        self.cnn = reference_trunk(s.channels, [2, 2, 2, (2, 1), (2, 1)])
        features = CHANNELS[-1] * (s.height // 32)
        self.head = SequenceHead(features, s.hidden, 2, num_classes, cell=cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cnn(x))


def gru(s: Settings, num_classes: int, max_length: int) -> ConvRNN:
    return ConvRNN(s, num_classes, max_length, cell="gru")


def lstm(s: Settings, num_classes: int, max_length: int) -> ConvRNN:
    return ConvRNN(s, num_classes, max_length, cell="lstm")
