"""The second seed's CTC models: 5 blocks of 2x(conv3x3+BN+ReLU), pooling 2,2,2,(2,1),(2,1),
height flattened into features, 2 bidirectional GRU (Keras version) or LSTM (PyTorch version)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.models.layers import InputSettings, SequenceHead, conv_bn_relu

CHANNELS = (32, 64, 128, 256, 256)


def seed_trunk(in_channels: int, pools) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out, pool in zip(CHANNELS, pools):
        layers += conv_bn_relu(c_in, c_out) + conv_bn_relu(c_out, c_out) + [nn.MaxPool2d(pool)]
        c_in = c_out
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class GRUSettings(InputSettings):
    height: int = 64
    width: int = 128
    channels: int = 3
    hidden: int = 128
    cell: str = "gru"


@dataclass(frozen=True)
class LSTMSettings(GRUSettings):
    cell: str = "lstm"


class ConvRNN(nn.Module):
    def __init__(self, s: GRUSettings, num_classes: int, max_length: int):
        super().__init__()
        self.cnn = seed_trunk(s.channels, [2, 2, 2, (2, 1), (2, 1)])
        features = CHANNELS[-1] * (s.height // 32)
        self.head = SequenceHead(features, s.hidden, 2, num_classes, cell=s.cell)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.cnn(x))
