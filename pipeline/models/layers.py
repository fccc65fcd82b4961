"""Building blocks shared by the architectures."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class InputSettings:
    height: int = 64
    width: int = 128
    channels: int = 1  # 1: grayscale, 3: RGB


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


def check_steps(model: nn.Module, settings: InputSettings, max_length: int, ctc: bool = True) -> int:
    """Output time steps for one input; CTC needs at least 2 * max_length - 1 (repeats need blanks)."""
    with torch.no_grad():
        was = model.training
        model.eval()
        steps = model(torch.zeros(1, settings.channels, settings.height, settings.width)).shape[1]
        model.train(was)
    need = 2 * max_length - 1 if ctc else max_length
    if steps < need:
        from pipeline.params import ParamsError

        raise ParamsError(f"model: {steps} output steps cannot emit labels of {max_length} characters "
                          f"(need {need}); widen the input (model.<arch>.width)")
    return steps
