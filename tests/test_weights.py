"""Fine-tuning levers on the weights (pipeline/training/weights.py): the trunk's learning rate, the
moving average that val reads and model.pt keeps, and the pull toward the pretrained weights. Each
test fails if its lever does nothing."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.errors import ParamsError
from pipeline.model import checkpoint
from pipeline.model.transfer import is_output_layer
from pipeline.params import load_params
from pipeline.stages.train import train
from pipeline.training.weights import WeightAverage
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


def test_the_anchor_pulls_the_trunk_back_and_leaves_the_output_layer(pretrained, tiny_copy):
    _, free = fine_tune(tiny_copy, l2sp=0.0)
    _, held = fine_tune(tiny_copy, l2sp=300.0)  # lr 3e-3: most of the way back at each step but the last
    assert moved(held, pretrained, output=False) < 0.3 * moved(free, pretrained, output=False)
    assert moved(held, pretrained, output=True) > 0.5 * moved(free, pretrained, output=True)
    with pytest.raises(ParamsError, match=r"^train.l2sp: pulls toward pretrained weights"):
        load_params(write_params(tiny_copy, {"train": {"l2sp": 1.0, "init_from": ""}}))


def test_model_pt_keeps_the_moving_average_and_last_pt_the_weights(pretrained, tiny_copy):
    kept, last = fine_tune(tiny_copy, ema=0.9)
    floats = [k for k in last if last[k].is_floating_point()]
    assert any(not torch.equal(kept[k], last[k]) for k in floats)
    # the average lies between where the run started and where it ended
    assert 0 < moved(kept, pretrained, output=False) < moved(last, pretrained, output=False)
    plain, plain_last = fine_tune(tiny_copy, ema=0.0)
    assert all(torch.equal(plain[k], plain_last[k]) for k in floats)


def test_the_average_follows_its_formula():
    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.5)
    expected = model.weight.detach().clone()
    for step in range(1, 6):
        with torch.no_grad():
            model.weight.add_(1.0)
        average.update(model)
        decay = min(0.5, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * model.weight.detach()
    assert torch.allclose(average.model.weight, expected)
    assert not average.model.weight.requires_grad


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
