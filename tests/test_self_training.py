"""Unlabelled captchas: ingest keeps them apart (never in val or test, never a copy of a labelled
one), and train.pseudo_rounds trains on the readings that are confident enough on val."""
from __future__ import annotations

import math
import random

import pyarrow.parquet as pq
import pytest

from pipeline.errors import ParamsError
from pipeline.params import load_params
from pipeline.stages.ingest import ingest
from pipeline.stages.train import train
from pipeline.training.self_training import confidence_threshold
from tests.conftest import write_params
from tests.test_ingest import encode

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


def test_self_training_adds_confident_readings(tiny_copy):
    site_folder(tiny_copy / "site", 60, 60)
    sources = {"data/manifest.parquet": 1, "data/ingest/manifest.parquet": 1}
    write_params(tiny_copy, {"ingest": {"source": "site", "unlabelled": True},
                             "train": {"sources": sources, "epochs": 3, "pseudo_rounds": 2,
                                       "pseudo_precision": 0.5}})
    params = load_params("params.yaml")
    ingest(params.data, params.ingest)
    summary = train(params, progress=False)
    rounds = summary["pseudo_rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and [r["after_epoch"] for r in rounds] == [1, 2]
    assert all(r["unlabelled"] == 60 and 0 <= r["pseudo_labels"] <= 60 for r in rounds)
    # each round's pseudo-labels replace the last's in the epochs after it
    labelled = 240 + sum(row["split"] == "train" for row in pq.read_table("data/ingest/manifest.parquet").to_pylist())
    assert summary["images_seen"] == 3 * labelled + rounds[0]["pseudo_labels"] + rounds[1]["pseudo_labels"]


def test_self_training_without_unlabelled_samples_is_one_line(tiny_copy):
    write_params(tiny_copy, {"train": {"pseudo_rounds": 1}})
    with pytest.raises(ParamsError, match=r"^train.pseudo_rounds: the sources hold no unlabelled samples"):
        train(load_params("params.yaml"), progress=False)
