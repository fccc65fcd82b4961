"""ddddocr's float captcha reader (`common.onnx` in the `ddddocr` wheel, MIT) as plain torch layers.

A small EfficientNetV2-like CNN: a stride-2 stem and three stages of fused-MBConv blocks (3x3
conv + SiLU, 1x1 projection, residual), each stage halving both axes, so a 64-pixel-high input
gives 8 rows x 64 channels per step and one step per 8 columns; then a BiLSTM of hidden size 512
and a linear layer. Batch norm was folded into the convolutions by its authors, so every conv has
a bias and there is no normalisation to freeze or train.

`packaged_weights()` reads the weights from the installed wheel's ONNX file (found through the
package's own location; nothing is downloaded) and maps them onto this module's names; the
output layer holds ddddocr's 8,210 classes (blank first), which `train.init_from: ddddocr` cuts to
the project's charset (pipeline/model/transfer.py).
"""
from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError, require
from pipeline.model.layers import InputSettings, check_dropout

WHEEL = "ddddocr"
ONNX_FILE = "common.onnx"  # the float model (`beta=True`); common_old.onnx is quantized
CHARSET_FILE = "charsets.py"  # CHARSET_BETA: the classes of common.onnx, "" (blank) first
STAGES = [(24, 1, 2), (48, 4, 4), (64, 4, 4)]  # (channels, expansion, blocks): the first block strides 2
PACKAGED_TRUNK = "ddddocr"  # train.init_from: this trunk, weights from the installed wheel
INSTALL_HINT = "pip install -c constraints.txt -e '.[ddddocr]' (or `make install`)"


@dataclass(frozen=True)
class Settings(InputSettings):
    hidden: int  # BiLSTM hidden size; 512 to load ddddocr's weights
    dropout: float  # before the output layer

    # ddddocr's own preprocessing: pixels in [0, 1], Lanczos resampling (pipeline/model/preprocess.py)
    mean = 0.0
    std = 1.0
    resample = "lanczos"

    def check(self, prefix: str) -> None:
        super().check(prefix)
        require(self.height % 8 == 0 and self.height >= 8, f"{prefix}.height",
                f"must be a multiple of 8 (three halvings), got {self.height}")
        require(0 < self.hidden <= 4096, f"{prefix}.hidden", f"must be from 1 to 4096, got {self.hidden}")
        check_dropout(self.dropout, f"{prefix}.dropout")


class FusedMBConv(nn.Module):
    """3x3 conv (to c_in x expansion channels, maybe strided) + SiLU, then a 1x1 projection to c_out;
    residual when the shapes match."""

    def __init__(self, c_in: int, c_out: int, expansion: int, stride: int):
        super().__init__()
        mid = c_in * expansion
        self.expand = nn.Conv2d(c_in, mid, 3, stride, 1)
        self.project = nn.Conv2d(mid, c_out, 1)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(nn.functional.silu(self.expand(x)))
        return x + y if self.residual else y


class DdddOcrNet(nn.Module):
    def __init__(self, s: Settings, num_classes: int, max_length: int):
        super().__init__()
        self.stem = nn.Conv2d(s.channels, STAGES[0][0], 3, 2, 1)
        blocks, c_in = [], STAGES[0][0]
        for i, (c_out, expansion, count) in enumerate(STAGES):
            for j in range(count):
                stride = 2 if j == 0 and i > 0 else 1
                blocks.append(FusedMBConv(c_in, c_out, expansion, stride))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.rnn = nn.LSTM(c_in * (s.height // 8), s.hidden, bidirectional=True, batch_first=True)
        self.dropout = nn.Dropout(s.dropout)
        self.classifier = nn.Linear(2 * s.hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(nn.functional.silu(self.stem(x)))
        b, c, h, w = features.shape
        seq, _ = self.rnn(features.permute(0, 3, 1, 2).reshape(b, w, c * h))
        return self.classifier(self.dropout(seq))


# ---------------------------------------------------------------------------------------------
# the weights inside the installed wheel


def wheel_folder() -> Path:
    """The installed `ddddocr` package's folder, found without importing it (its import pulls in
    OpenCV and onnxruntime sessions)."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"train.init_from: ddddocr: the `ddddocr` wheel is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_charset(folder: Path) -> list[str]:
    """CHARSET_BETA, read as data from the wheel's charsets.py (ast, never executed)."""
    tree = ast.parse((folder / CHARSET_FILE).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CHARSET_BETA":
            return ast.literal_eval(node.value)
    raise PipelineError(f"{folder / CHARSET_FILE}: no CHARSET_BETA; is this ddddocr 1.6?")


def _lstm_gates(w: np.ndarray) -> np.ndarray:
    """ONNX orders an LSTM's gates i, o, f, c; torch orders them i, f, c (g), o."""
    i, o, f, c = np.split(w, 4, axis=0)
    return np.concatenate([i, f, c, o], axis=0)


def packaged_weights() -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state_dict for DdddOcrNet with hidden 512, height 64, channels 1; its classes, blank first)."""
    import onnx
    from onnx import numpy_helper

    folder = wheel_folder()
    path = folder / ONNX_FILE
    if not path.is_file():
        raise PipelineError(f"train.init_from: ddddocr: {path} is missing; reinstall the wheel ({INSTALL_HINT})")
    graph = onnx.load(str(path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    (lstm,) = [node for node in graph.node if node.op_type == "LSTM"]
    (gemm,) = [node for node in graph.node if node.op_type == "Gemm"]
    names = ["stem"] + [f"blocks.{i}.{part}" for i in range(sum(n for _, _, n in STAGES)) for part in ("expand", "project")]
    if len(convs) != len(names):
        raise PipelineError(f"{path}: {len(convs)} convolutions, expected {len(names)}; not ddddocr 1.6's common.onnx")
    state = {}
    for name, node in zip(names, convs):
        state[f"{name}.weight"], state[f"{name}.bias"] = init[node.input[1]], init[node.input[2]]
    w, r, bias = (init[name] for name in lstm.input[1:4])
    hidden = r.shape[-1]
    for d, suffix in enumerate(("", "_reverse")):
        state[f"rnn.weight_ih_l0{suffix}"] = _lstm_gates(w[d])
        state[f"rnn.weight_hh_l0{suffix}"] = _lstm_gates(r[d])
        state[f"rnn.bias_ih_l0{suffix}"] = _lstm_gates(bias[d][: 4 * hidden])
        state[f"rnn.bias_hh_l0{suffix}"] = _lstm_gates(bias[d][4 * hidden:])
    state["classifier.weight"], state["classifier.bias"] = init[gemm.input[1]], init[gemm.input[2]]
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, packaged_charset(folder)
