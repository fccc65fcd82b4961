from __future__ import annotations

import pytest

from pipeline.read.metrics import align, compute_metrics


@pytest.mark.parametrize("truth, pred, distance, matched", [
    ("ABCD", "ABCD", 0, 4),
    ("ABCD", "ABXD", 1, 3),
    ("ABCD", "ABD", 1, 3),
    ("ABCD", "ABCDE", 1, 4),
    ("ABCD", "", 4, 0),
    ("", "AB", 2, 0),
    ("O0O0", "0O0O", 2, 3),
])
def test_alignment(truth, pred, distance, matched):
    d, pairs = align(truth, pred)
    assert d == distance
    assert sum(a == b for a, b in pairs) == matched


def test_metrics_on_hand_made_predictions():
    truths = ["ABCD", "ABCD", "1234", "12345", "XYZW"]
    preds = ["ABCD", "ABXD", "123", "12345", ""]
    confs = [0.99, 0.4, 0.7, 0.95, 0.1]
    m = compute_metrics(truths, preds, confs, thresholds=[0.9])
    assert m["n"] == 5
    assert m["seq_accuracy"] == pytest.approx(2 / 5)
    chars = 4 + 4 + 4 + 5 + 4
    assert m["char_accuracy"] == pytest.approx((4 + 3 + 3 + 5 + 0) / chars)
    assert m["cer"] == pytest.approx((0 + 1 + 1 + 0 + 4) / chars)
    assert m["per_length"] == {"4": pytest.approx(1 / 4), "5": 1.0}
    assert m["mean_confidence"] == pytest.approx(sum(confs) / 5)
    assert m["reject"]["0.9"] == {"coverage": pytest.approx(2 / 5), "seq_accuracy": 1.0}
    assert m["top_confusions"] == [{"true": "C", "pred": "X", "count": 1}]


def test_metrics_of_nothing():
    m = compute_metrics([], [], [])
    assert m["n"] == 0 and m["seq_accuracy"] == 0.0
