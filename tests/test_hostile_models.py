"""Checkpoints that load but cannot read (issue: hostile input, round 3): one line from predict,
serve refuses them at start-up, a SIGHUP never swaps one in, and no answer is ever a NaN."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.__main__ import cli
from pipeline.errors import PipelineError
from pipeline.model import checkpoint
from pipeline.read.recognizer import Recognizer
from pipeline.serving.app import create_app
from pipeline.serving.live_model import LiveModel


def altered(tiny_dataset, tmp_path, name: str, change) -> str:
    ckpt = checkpoint.read(tiny_dataset / "models/model.pt")
    change(ckpt)
    path = tmp_path / f"{name}.pt"
    torch.save(ckpt, path)
    return str(path)


def poison(ckpt):
    for value in ckpt["state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))


BROKEN = {
    "a newer preprocess key": (lambda c: c["preprocess"].update(gamma=2.2), "unknown preprocess key 'gamma'"),
    "three channels on a gray network": (lambda c: c["preprocess"].update(channels=3), "cannot read an image"),
    "height 0": (lambda c: c["preprocess"].update(height=0), "bad height 0"),
    "a resample of its own": (lambda c: c["preprocess"].update(resample="cubic"), "bad resample 'cubic'"),
    "NaN weights": (poison, "NaN or infinite scores"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_predict_refuses_a_checkpoint_that_cannot_read_in_one_line(tiny_dataset, tmp_path, name):
    change, message = BROKEN[name]
    path = altered(tiny_dataset, tmp_path, name.replace(" ", "-"), change)
    image = tiny_dataset / "models/model.pt"  # any file: the model is refused before inputs are read
    result = CliRunner().invoke(cli, ["predict", "--model", path, str(image)])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    with pytest.raises(PipelineError, match=message):
        Recognizer(path)


def test_a_sighup_never_swaps_in_a_model_that_cannot_read(tiny_dataset, tmp_path):
    good = Recognizer(tiny_dataset / "models/model.pt", onnx=False)
    path = tmp_path / "served.pt"
    live = LiveModel(good, lambda: Recognizer(path, onnx=False))
    for name, (change, message) in BROKEN.items():
        path.write_bytes(open(altered(tiny_dataset, tmp_path, "x", change), "rb").read())
        assert not live.reload() and live.current is good and message in live.last_error, name
    client = create_app(live).test_client()
    assert client.get("/healthz").json["status"] == "degraded"


def test_no_nan_ever_reaches_a_json_answer(tiny_dataset, monkeypatch):
    """A model answering NaN for some image (not the blank one checked at load): confidence 0."""
    recognizer = Recognizer(tiny_dataset / "models/model.pt", onnx=False)
    monkeypatch.setattr(recognizer, "probs", lambda batch: np.full((len(batch), 24, 37), np.nan, np.float32))
    client = create_app(recognizer).test_client()
    png = (tiny_dataset / "data/shards").glob("test/*.tar").__next__()
    from pipeline.data.shards import iter_tar

    image = next(iter_tar(png))["png"]
    for query in ("", "?beam=4"):
        response = client.post(f"/predict{query}", data=image, content_type="image/png")
        body = json.loads(response.data)
        assert response.status_code == 200 and "NaN" not in response.get_data(as_text=True)
        assert math.isfinite(body["confidence"]) and body["confidence"] == 0.0


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_refuses_a_model_that_cannot_read_at_start_up(tiny_dataset, tmp_path, workers):
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.helpers import free_port

    path = altered(tiny_dataset, tmp_path, "nan", poison)
    result = subprocess.run([sys.executable, "-m", "pipeline", "serve", "--model", path, "--port", str(free_port()),
                             "--workers", str(workers)], cwd=REPO, capture_output=True, text=True, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and errors == [f"error: {path}: the model answers NaN or infinite scores (broken weights)"]
