"""CTC decoding of per-step class probabilities: best path, prefix beam search, and a
label's probability over all its alignments."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def greedy_decode(probs: np.ndarray, collapse_repeats: bool = True) -> list[tuple[list[int], float]]:
    """Best path decoding of (batch, time, classes) probabilities.

    Repeats are collapsed *before* blanks are removed, so `A A - A` is `AA` and `6 - 6 - 6 - 6`
    is `6666`. The confidence is the probability of the decoded label: for CTC summed over all
    its alignments (`label_probability`), for fixed positions the product of their maxima. The
    best path's own probability would be a poor confidence: a model that reads correctly but
    leaves 1% of each step's mass off the best path scores 0.99 ** steps.
    """
    best = probs.argmax(axis=-1)
    labels = []
    for path in best:
        if collapse_repeats:
            keep = np.ones(len(path), dtype=bool)
            keep[1:] = path[1:] != path[:-1]
            path = path[keep]
        labels.append([int(i) for i in path if i != 0])
    if collapse_repeats:
        confidence = label_probability(probs, labels)
    else:
        conf = np.take_along_axis(probs, best[..., None], axis=-1)[..., 0]
        confidence = np.exp(np.log(np.clip(conf, 1e-30, 1.0)).sum(axis=-1))
    return [(ids, float(c)) for ids, c in zip(labels, confidence)]


def label_probability(probs: np.ndarray, labels: list[list[int]]) -> np.ndarray:
    """P(label | x) under CTC for each sample of (batch, time, classes) probabilities, summed over
    all alignments: exp(-ctc_loss), computed by torch's forward algorithm (0.07 ms for one image)."""
    log_probs = torch.from_numpy(np.log(np.clip(probs, 1e-30, 1.0), dtype=np.float32)).transpose(0, 1)
    targets = torch.tensor([c for label in labels for c in label], dtype=torch.long)
    lengths = torch.tensor([len(label) for label in labels], dtype=torch.long)
    steps = torch.full((len(labels),), probs.shape[1], dtype=torch.long)
    nll = F.ctc_loss(log_probs, targets, steps, lengths, blank=0, reduction="none")  # inf -> 0
    return torch.exp(-nll).numpy()


def decode(probs: np.ndarray, beam_width: int = 1, collapse_repeats: bool = True):
    """Greedy decoding for beam width 1 (or fixed-length heads), else CTC prefix beam search."""
    if beam_width <= 1 or not collapse_repeats:
        return greedy_decode(probs, collapse_repeats)
    return beam_decode(probs, beam_width)


def beam_decode(probs: np.ndarray, beam_width: int) -> list[tuple[list[int], float]]:
    """CTC prefix beam search over (batch, time, classes) probabilities.

    Returns, for each sample, the most probable label sequence summed over all its alignments
    and that probability (in [0, 1]).
    """
    return [_prefix_beam(p.astype(np.float64), beam_width) for p in probs]


def _prefix_beam(probs: np.ndarray, beam_width: int) -> tuple[list[int], float]:
    # Each prefix keeps two probabilities: of ending in a blank, and of ending in its last label.
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (1.0, 0.0)}
    for step in probs:
        # Prune classes too unlikely to matter; keep at least the best few.
        candidates = [c for c in np.argsort(step)[::-1][: max(beam_width, 4)] if c != 0]
        blank = float(step[0])
        nxt: dict[tuple[int, ...], list[float]] = {}

        def add(prefix, pb=0.0, pnb=0.0):
            entry = nxt.setdefault(prefix, [0.0, 0.0])
            entry[0] += pb
            entry[1] += pnb

        for prefix, (pb, pnb) in beams.items():
            add(prefix, pb=(pb + pnb) * blank)
            for c in candidates:
                p = float(step[c])
                if prefix and prefix[-1] == c:
                    add(prefix, pnb=pnb * p)  # repeat without a blank in between: same label
                    add(prefix + (c,), pnb=pb * p)  # repeat after a blank: a new label
                else:
                    add(prefix + (c,), pnb=(pb + pnb) * p)
        ranked = sorted(nxt.items(), key=lambda kv: kv[1][0] + kv[1][1], reverse=True)
        beams = {k: (v[0], v[1]) for k, v in ranked[:beam_width]}
    prefix, (pb, pnb) = max(beams.items(), key=lambda kv: kv[1][0] + kv[1][1])
    return list(prefix), float(min(1.0, pb + pnb))
