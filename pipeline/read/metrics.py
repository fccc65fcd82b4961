"""Recognition metrics from (truth, prediction, confidence) triples."""
from __future__ import annotations

import math
from collections import Counter, defaultdict


def align(truth: str, pred: str) -> tuple[int, list[tuple[str, str]]]:
    """Levenshtein alignment: (edit distance, aligned (true, pred) character pairs).

    The pairs are the matches and substitutions of one minimal alignment, in order; inserted
    and deleted characters have no partner and are left out.
    """
    n, m = len(truth), len(pred)
    dist = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n + 1):
        dist[i][0] = i
    for j in range(m + 1):
        dist[0][j] = j
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = truth[i - 1] != pred[j - 1]
            dist[i][j] = min(dist[i - 1][j] + 1, dist[i][j - 1] + 1, dist[i - 1][j - 1] + cost)
    # walk back, preferring diagonal moves
    i, j, pairs = n, m, []
    while i > 0 and j > 0:
        cost = truth[i - 1] != pred[j - 1]
        if dist[i][j] == dist[i - 1][j - 1] + cost:
            pairs.append((truth[i - 1], pred[j - 1]))
            i, j = i - 1, j - 1
        elif dist[i][j] == dist[i - 1][j] + 1:
            i -= 1
        else:
            j -= 1
    return dist[n][m], pairs[::-1]


def compute_metrics(truths: list[str], preds: list[str], confidences: list[float] | None = None,
                    thresholds: list[float] = (), top_confusions: int = 10) -> dict:
    n = len(truths)
    confidences = list(confidences) if confidences is not None else [1.0] * n
    correct = [t == p for t, p in zip(truths, preds)]
    chars = errors = matched = 0
    confusions: Counter = Counter()
    by_length: dict[int, list[bool]] = defaultdict(list)
    for t, p, ok in zip(truths, preds, correct):
        d, pairs = align(t, p)
        chars += len(t)
        errors += d
        matched += sum(a == b for a, b in pairs)
        confusions.update((a, b) for a, b in pairs if a != b)
        by_length[len(t)].append(ok)
    metrics = {
        "seq_accuracy": sum(correct) / n if n else 0.0,
        "char_accuracy": matched / chars if chars else 0.0,
        "cer": errors / chars if chars else 0.0,
        "n": n,
        "per_length": {str(k): sum(v) / len(v) for k, v in sorted(by_length.items())},
        "mean_confidence": sum(confidences) / n if n else 0.0,
        "reject": {},
        "top_confusions": [{"true": a, "pred": b, "count": c} for (a, b), c in confusions.most_common(top_confusions)],
    }
    for t in thresholds:
        kept = [ok for ok, c in zip(correct, confidences) if c >= t]
        metrics["reject"][str(t)] = {
            "coverage": len(kept) / n if n else 0.0,
            "seq_accuracy": sum(kept) / len(kept) if kept else 0.0,
        }
    return metrics


def confidence_threshold(readings: list[tuple[str, str, float]], precision: float) -> float:
    """The lowest confidence t such that the (truth, reading, confidence) triples with confidence
    >= t are right at least `precision` of the time; inf when no such t exists."""
    ranked = sorted(readings, key=lambda r: -r[2])
    threshold, right = math.inf, 0
    for i, (truth, reading, confidence) in enumerate(ranked, 1):
        right += truth == reading
        # ties: every reading of this confidence is kept with it, so judge at the last of them
        if right / i >= precision and (i == len(ranked) or ranked[i][2] < confidence):
            threshold = confidence
    return threshold


def finite_or_none(threshold: float) -> float | None:
    """A threshold as JSON holds it: None where no confidence is precise enough."""
    return None if math.isinf(threshold) else round(threshold, 6)
