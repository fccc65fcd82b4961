"""Unlabelled captchas: ingest keeps them apart (never in val or test, never a copy of a labelled
one); train.pseudo_rounds and train.consistency train on the readings that are confident enough on
val (ddddocr's trunk reads the yardstick's digits style, so its readings are worth training on)."""
from __future__ import annotations

import hashlib
import math
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from benchmarks.yardstick import render_style
from pipeline.charset import Charset
from pipeline.errors import ParamsError
from pipeline.model import checkpoint
from pipeline.model.settings import load_model_params
from pipeline.params import load_params
from pipeline.read.metrics import confidence_threshold
from pipeline.stages.ingest import ingest
from pipeline.stages.train import train
from pipeline.training import self_training
from pipeline.training.self_training import write_pseudo_shard
from tests.conftest import digits_site, fine_tune_params, write_params
from tests.helpers import encode

CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def brute_threshold(readings, precision):
    """The lowest confidence among the readings whose keep-set (confidence >= it) meets the precision."""
    ok = [c for _, _, c in readings
          if sum(t == r for t, r, x in readings if x >= c) >= precision * sum(x >= c for _, _, x in readings)]
    return min(ok, default=math.inf)


def test_confidence_threshold_against_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        readings = [("A", rng.choice("AB"), rng.choice([0.2, 0.5, 0.5, 0.9, 0.99, rng.random()]))
                    for _ in range(rng.randint(1, 12))]
        for precision in (0.5, 0.9, 1.0):
            assert confidence_threshold(readings, precision) == brute_threshold(readings, precision)
    assert confidence_threshold([("A", "B", 0.9)], 0.99) == math.inf


def site_folder(folder, labelled: int, unlabelled: int):
    folder.mkdir()
    for i in range(labelled):
        label = "".join(CHARS[(i * 7 + j * 5) % 36] for j in range(4))
        (folder / f"{label}_{i}.png").write_bytes(encode(label, 5000 + i))
    for i in range(unlabelled):  # the pattern ^(?P<label>[^_.]+) matches no name starting with "_"
        label = "".join(CHARS[(i * 11 + j * 3) % 36] for j in range(4))
        (folder / f"_u{i}.png").write_bytes(encode(label, 9000 + i))


def test_ingest_keeps_unlabelled_images_apart(tiny_copy):
    site_folder(tiny_copy / "site", 40, 30)
    first = next((tiny_copy / "site").glob("[!_]*.png"))
    (tiny_copy / "site/_copy_of_a_labelled_one.png").write_bytes(first.read_bytes())
    write_params(tiny_copy, {"ingest": {"source": "site", "unlabelled": True}})
    params = load_params("params.yaml")
    report = ingest(params.data, params.ingest)
    manifest = pq.read_table("data/ingest/manifest.parquet").to_pylist()
    unlabelled = [row for row in manifest if row["split"] == "unlabelled"]
    assert len(unlabelled) == 30 and report["per_split"]["unlabelled"] == 30
    assert all(row["label"] == "" and "/unlabelled/" in row["shard"] for row in unlabelled)
    assert {row["split"] for row in manifest} - {"unlabelled"} <= {"train", "val", "test"}
    assert sum(row["split"] != "unlabelled" for row in manifest) == 40
    assert not {r["sha256"] for r in unlabelled} & {r["sha256"] for r in manifest if r["split"] != "unlabelled"}
    # without ingest.unlabelled such names are invalid, as before
    write_params(tiny_copy, {"ingest": {"source": "site"}})
    params = load_params("params.yaml")
    with pytest.raises(Exception, match="31 invalid file"):
        ingest(params.data, params.ingest)


def truths_by_key(site: Path) -> dict[str, str]:
    """The true label of each ingested unlabelled sample (the digits site's `_u<i>.png`), by key."""
    truth = [label for label, _ in render_style("digits", "unlabelled", len(list(site.glob("_u*.png"))))]
    by_digest = {hashlib.sha256((site / f"_u{i}.png").read_bytes()).hexdigest(): label for i, label in enumerate(truth)}
    rows = pq.read_table("data/ingest/manifest.parquet").to_pylist()
    return {row["key"]: by_digest[row["sha256"]] for row in rows if row["split"] == "unlabelled"}


def test_self_training_adds_the_confident_readings_and_they_are_right(tmp_path, monkeypatch):
    """ddddocr's trunk reads the digits site: the round keeps the readings val says are precise
    enough, and they are right about as often as val promised."""
    monkeypatch.chdir(tmp_path)
    site = digits_site(tmp_path / "site", 40, 30)
    fine_tune_params(tmp_path, "site", {"epochs": 2, "pseudo_rounds": 1, "pseudo_precision": 0.9}, unlabelled=True)
    params = load_model_params("params.yaml")
    ingest(params.data, params.ingest)
    written = {}

    def capture(shards, labels, path):
        written.update(labels)
        return write_pseudo_shard(shards, labels, path)

    monkeypatch.setattr(self_training, "write_pseudo_shard", capture)
    summary = train(params, progress=False)
    (round_one,) = summary["pseudo_rounds"]
    assert round_one["round"] == 1 and round_one["after_epoch"] == 1 and round_one["unlabelled"] == 30
    assert round_one["pseudo_labels"] == len(written) >= 15
    truth = truths_by_key(site)
    assert sum(truth[key] == text for key, text in written.items()) >= 0.8 * len(written)
    # the pseudo-labels join the labelled captchas in the epoch after the round
    labelled = sum(row["split"] == "train" for row in pq.read_table("data/ingest/manifest.parquet").to_pylist())
    assert summary["images_seen"] == 2 * labelled + round_one["pseudo_labels"]


def test_consistency_trains_strong_views_on_confident_weak_readings(tmp_path, monkeypatch):
    """With train.consistency, from the second epoch on (once val has chosen a threshold) the
    unlabelled captchas' confident readings are targets, and the weights end elsewhere than
    without them; the targets are right about as often as val promised."""
    monkeypatch.chdir(tmp_path)
    site = digits_site(tmp_path / "site", 40, 30)
    targets = []
    real_encode = Charset.encode

    def spy(charset, text):  # every text the run encodes: the labelled batches' and the targets
        targets.append(text)
        return real_encode(charset, text)

    runs = {}
    for weight in (0.0, 1.0):
        fine_tune_params(tmp_path, "site", {"epochs": 2, "consistency": weight, "pseudo_precision": 0.9},
                         unlabelled=True)
        params = load_model_params("params.yaml")
        if weight == 0.0:
            ingest(params.data, params.ingest)
        targets.clear()
        monkeypatch.setattr(Charset, "encode", spy)
        runs[weight] = train(params, progress=False), checkpoint.read(Path("models/last.pt"))["state_dict"]
        monkeypatch.setattr(Charset, "encode", real_encode)
    summary, weights = runs[1.0]
    read, used = summary["consistency"]["unlabelled_read"], summary["consistency"]["used_as_targets"]
    assert read >= 16 and used >= 8 and summary["consistency"]["last_threshold"] is not None
    assert runs[0.0][0]["consistency"] == {}
    assert any(not torch.equal(weights[k], runs[0.0][1][k]) for k in weights)
    truths = set(truths_by_key(site).values())
    assert sum(text in truths for text in targets) >= used * 0.8  # (labelled texts are in no unlabelled truth)


def test_consistency_without_unlabelled_samples_is_one_line(tiny_copy):
    write_params(tiny_copy, {"train": {"consistency": 1.0}})
    with pytest.raises(ParamsError, match=r"^train.consistency: the sources hold no unlabelled samples"):
        train(load_params("params.yaml"), progress=False)


def test_self_training_without_unlabelled_samples_is_one_line(tiny_copy):
    write_params(tiny_copy, {"train": {"pseudo_rounds": 1}})
    with pytest.raises(ParamsError, match=r"^train.pseudo_rounds: the sources hold no unlabelled samples"):
        train(load_params("params.yaml"), progress=False)
