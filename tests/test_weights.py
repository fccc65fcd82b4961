"""The trunk's learning rate (pipeline/training/weights.py), which fails if the lever does nothing,
and which weights model.pt keeps."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.model import checkpoint
from pipeline.model.transfer import is_output_layer
from pipeline.params import load_params
from pipeline.stages.train import train
from tests.conftest import write_params


@pytest.fixture
def pretrained(tiny_copy):
    """The tiny model copied to pretrained/, the init_from of the runs below."""
    (tiny_copy / "pretrained").mkdir(exist_ok=True)
    shutil.copy("models/model.pt", "pretrained/start.pt")
    return checkpoint.read(tiny_copy / "pretrained/start.pt")["state_dict"]


def fine_tune(folder, **train_params) -> tuple[dict, dict]:
    """One epoch from pretrained/start.pt; (model.pt's weights, last.pt's weights)."""
    write_params(folder, {"train": {"init_from": "pretrained/start.pt", "epochs": 1, **train_params}})
    train(load_params("params.yaml"), progress=False)
    return checkpoint.read(folder / "models/model.pt")["state_dict"], checkpoint.read(folder / "models/last.pt")["state_dict"]


def moved(weights: dict, start: dict, output: bool) -> float:
    """How far the trunk's (or the output layer's) float weights moved from `start`, in total."""
    return sum(float((weights[k] - start[k]).abs().sum()) for k in start
               if start[k].is_floating_point() and "running_" not in k and is_output_layer(k) == output)


def test_the_trunk_learns_at_its_fraction_of_the_rate(pretrained, tiny_copy):
    _, full = fine_tune(tiny_copy, trunk_lr=1.0)
    _, slow = fine_tune(tiny_copy, trunk_lr=0.001)
    assert moved(slow, pretrained, output=False) < 0.02 * moved(full, pretrained, output=False)
    assert moved(slow, pretrained, output=True) > 0.2 * moved(full, pretrained, output=True)


def test_without_a_val_split_model_pt_is_the_last_epoch(tmp_path, monkeypatch):
    """Every label can go to training (ingest.fractions train 1.0): with nothing to choose by,
    model.pt follows the latest epoch instead of staying at the first."""
    from pipeline.model.settings import load_model_params
    from pipeline.stages.ingest import ingest
    from tests.conftest import digits_site, fine_tune_params

    monkeypatch.chdir(tmp_path)
    digits_site(tmp_path / "site", 30, 0)
    fine_tune_params(tmp_path, "site", {"epochs": 2}, fractions={"train": 1.0, "val": 0.0, "test": 0.0})
    params = load_model_params("params.yaml")
    ingest(params.data, params.ingest)
    summary = train(params, progress=False)
    kept, last = checkpoint.read(tmp_path / "models/model.pt"), checkpoint.read(tmp_path / "models/last.pt")
    assert summary["epochs_run"] == 2 and kept["info"]["epoch"] == 2
    assert all(torch.equal(kept["state_dict"][k], last["state_dict"][k]) for k in kept["state_dict"])
