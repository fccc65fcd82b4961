"""Building blocks shared by the architectures."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import require


@dataclass(frozen=True)
class InputSettings:
    height: int
    width: int
    channels: int  # 1: grayscale, 3: RGB
    keep_aspect: bool  # resize to `height` keeping the aspect ratio, pad the width (else squash to height x width)

    def check(self, prefix: str) -> None:
        require(0 < self.height <= 1024, f"{prefix}.height", f"must be from 1 to 1024, got {self.height}")
        require(0 < self.width <= 4096, f"{prefix}.width", f"must be from 1 to 4096, got {self.width}")
        require(self.channels in (1, 3), f"{prefix}.channels", f"must be 1 (gray) or 3 (RGB), got {self.channels}")
        require(isinstance(self.keep_aspect, bool), f"{prefix}.keep_aspect", f"must be true or false, got {self.keep_aspect!r}")


def check_dropout(value: float, key: str) -> None:
    require(0 <= value < 1, key, f"must be in [0, 1), got {value}")


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, padding: int = 1, bn: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, padding=padding, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.ReLU(inplace=True))
    return layers


class SequenceHead(nn.Module):
    """(B, C, H, W) features -> flatten height into features -> BiRNN layers -> (B, W, classes)."""

    def __init__(self, features: int, hidden: int, layers: int, num_classes: int, cell: str = "gru",
                 dropout: float = 0.0):
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(features, hidden, num_layers=layers, bidirectional=True, batch_first=True,
                       dropout=dropout if layers > 1 else 0.0)
        self.classifier = nn.Linear(2 * hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        seq = features.permute(0, 3, 1, 2).reshape(b, w, c * h)
        out, _ = self.rnn(seq)
        return self.classifier(out)
