"""ddddocr's reader as an architecture of the project: its weights read from the installed wheel match
the wheel's own onnxruntime model, `train.init_from: ddddocr` cuts the output layer to the charset,
and the trained checkpoint exports, predicts and evaluates like any other."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.model import build_model, ddddocr
from pipeline.model.preprocess import Preprocess
from pipeline.model.settings import load_model_params
from pipeline.model.transfer import from_packaged_trunk
from pipeline.params import load_params
from tests.conftest import write_params

SETTINGS = ddddocr.Settings(height=64, width=128, channels=1, keep_aspect=True, hidden=512, dropout=0.0)


@pytest.fixture(scope="module")
def packaged():
    return ddddocr.packaged_weights()


def test_the_torch_module_matches_the_wheels_onnx_model(packaged):
    import onnxruntime as ort

    state, classes = packaged
    assert len(classes) == 8210 and classes[0] == "" and all(c in classes for c in "0123456789aAzZ")
    model = ddddocr.DdddOcrNet(SETTINGS, len(classes), 8).eval()
    model.load_state_dict(state)
    session = ort.InferenceSession(str(ddddocr.wheel_folder() / ddddocr.ONNX_FILE), providers=["CPUExecutionProvider"])
    for width in (64, 152):  # the width is free: one step per 8 columns
        x = np.random.default_rng(width).random((1, 1, 64, width), dtype=np.float32)
        expected = session.run(None, {session.get_inputs()[0].name: x})[0].transpose(1, 0, 2)  # (T, B, C) -> (B, T, C)
        with torch.no_grad():
            got = model(torch.from_numpy(x)).numpy()
        assert got.shape == expected.shape == (1, width // 8, 8210)
        assert np.abs(got - expected).max() < 1e-3


def test_init_from_ddddocr_cuts_the_output_layer_to_the_charset(packaged):
    state, classes = packaged
    charset = "0123456789ABC"
    model = build_model("ddddocr", SETTINGS, len(charset) + 1, 8)
    assert from_packaged_trunk(model, charset) == []
    new = model.state_dict()
    assert all(torch.equal(new[k], state[k]) for k in new if not k.startswith("classifier"))
    assert torch.equal(new["classifier.weight"][0], state["classifier.weight"][0])  # the blank
    assert torch.equal(new["classifier.weight"][1], state["classifier.weight"][classes.index("0")])
    # a case-folded charset reads letters from ddddocr's lower-case rows, the case it answers in
    assert torch.equal(new["classifier.weight"][11], state["classifier.weight"][classes.index("a")])
    both = "aA"
    model = build_model("ddddocr", SETTINGS, len(both) + 1, 8)
    from_packaged_trunk(model, both)
    assert torch.equal(model.state_dict()["classifier.weight"][2], state["classifier.weight"][classes.index("A")])


def test_preprocessing_is_ddddocrs():
    pre = Preprocess.of(SETTINGS)
    assert (pre.mean, pre.std, pre.resample, pre.keep_aspect) == (0.0, 1.0, "lanczos", True)
    white = pre(np.full((30, 60, 3), 255, np.uint8))
    assert white.shape == (1, 64, 128) and white.min() == white.max() == 1.0  # pixels / 255, no centring


def test_without_the_wheel_one_line_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ddddocr" else real(name, *a))
    with pytest.raises(PipelineError, match=r"^train.init_from: ddddocr: .*not installed.*\.\[ddddocr\]"):
        ddddocr.packaged_weights()


def test_fine_tune_from_ddddocr_then_export_and_predict(tiny_copy):
    from pipeline.read.recognizer import Recognizer
    from pipeline.stages.export import export
    from pipeline.stages.train import train

    write_params(tiny_copy, {"model": {"arch": "ddddocr", "ddddocr": {"width": 128}},
                             "train": {"init_from": "ddddocr", "freeze": ["stem", "blocks.0"], "epochs": 1}})
    params = load_model_params("params.yaml")
    before = ddddocr.packaged_weights()[0]["stem.weight"]
    summary = train(params, progress=False)
    assert summary["images_seen"] == 240 and summary["parameters"] < 6_000_000  # 8,210 classes cut to 37
    ckpt = torch.load("models/model.pt", weights_only=True)
    assert ckpt["arch"] == "ddddocr" and ckpt["preprocess"]["resample"] == "lanczos"
    assert torch.equal(ckpt["state_dict"]["stem.weight"], before)  # frozen
    result = export(load_params("params.yaml"))
    assert result["text_mismatches"] == 0
    assert Recognizer("models/model.pt").backend == "onnxruntime"


def test_a_freeze_prefix_that_names_nothing_is_one_line(tiny_copy):
    from pipeline.errors import ParamsError
    from pipeline.stages.train import Paths, build

    write_params(tiny_copy, {"train": {"freeze": ["stem"]}})
    with pytest.raises(ParamsError, match=r"^train.freeze\[0\]: no parameter of model FastCRNN is named 'stem'"):
        build(load_params("params.yaml"), Paths())
