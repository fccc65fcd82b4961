from __future__ import annotations

import itertools

import numpy as np
import pytest

from pipeline.charset import Charset
from pipeline.read.decode import beam_decode, decode, greedy_decode, label_probability

CS = Charset("0123456789ABO")
BLANK = "-"


def one_hot_path(path: str, sharpness: float = 0.9) -> np.ndarray:
    """A (1, T, C) probability table whose best path spells `path` ('-' is the blank)."""
    probs = np.full((len(path), CS.num_classes), (1 - sharpness) / (CS.num_classes - 1))
    for t, ch in enumerate(path):
        probs[t, 0 if ch == BLANK else CS.encode(ch)[0]] = sharpness
    return probs[None]


@pytest.mark.parametrize("path, text", [
    ("6-6-6-6", "6666"),
    ("66-6--66-6", "6666"),
    ("AA-AB-BB", "AABB"),
    ("AA-ABBB", "AAB"),
    ("A-AB-B", "AABB"),
    ("O0O0", "O0O0"),
    ("OO00OO00", "O0O0"),
    ("----", ""),
    ("-1-2-3-3", "1233"),
    ("AAAA", "A"),
    ("B--B", "BB"),
    ("9999-", "9"),
    ("12344", "1234"),  # a final repeated character is one character (a common decoder bug drops it)
    ("123-44", "1234"),
    ("123-4-4", "12344"),
])
def test_greedy_collapses_repeats_before_removing_blanks(path, text):
    [(ids, conf)] = greedy_decode(one_hot_path(path))
    assert CS.decode(ids) == text
    assert 0.9 ** len(path) * (1 - 1e-5) <= conf <= 1  # the best path is one of the label's alignments


def collapse(path) -> tuple[int, ...]:
    return tuple(c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1]))


def test_label_probability_sums_every_alignment():
    # brute force over all 4^5 paths of a 3-character charset: P(label) = sum of its paths
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(4), size=(3, 5))
    for b in range(3):
        totals: dict[tuple[int, ...], float] = {}
        for path in itertools.product(range(4), repeat=5):
            totals[collapse(path)] = totals.get(collapse(path), 0.0) + np.prod(probs[b, range(5), path])
        labels = [(), (1,), (2, 2), (1, 2, 3), (3, 3, 3), (1, 2, 1, 2)]
        got = label_probability(np.repeat(probs[b:b + 1], len(labels), 0), [list(x) for x in labels])
        assert got == pytest.approx([totals.get(x, 0.0) for x in labels], rel=1e-5, abs=1e-12)


def test_greedy_confidence_is_the_label_probability():
    # each character split over two steps: best path 0.7^4, label "AB" far more likely
    table = np.zeros((4, CS.num_classes))
    a, b = CS.encode("AB")
    table[0, a], table[0, 0] = 0.7, 0.3
    table[1, 0], table[1, a] = 0.7, 0.3
    table[2, b], table[2, 0] = 0.7, 0.3
    table[3, 0], table[3, b] = 0.7, 0.3
    [(ids, conf)] = greedy_decode(table[None])
    assert CS.decode(ids) == "AB"
    # paths for AB: A{A,-}B{B,-} over steps 0-1 and 2-3, plus -A.. / ..-B shifts: all alignments
    assert conf == pytest.approx(label_probability(table[None], [ids])[0])
    assert conf > 0.5 > 0.7 ** 4


def test_fixed_length_decoding_keeps_repeats_and_drops_empty_positions():
    [(ids, _)] = greedy_decode(one_hot_path("66-6"), collapse_repeats=False)
    assert CS.decode(ids) == "666"


def test_beam_width_one_is_greedy():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(CS.num_classes) * 0.3, size=(20, 12))
    assert decode(probs, beam_width=1) == greedy_decode(probs)


def test_beam_search_finds_the_more_probable_label():
    # Each step: blank 0.45, A 0.35, B 0.20. The best single path is blank-blank, "" (0.2025),
    # but the label "A" sums three paths: AA + A- + -A = 0.1225 + 0.1575 + 0.1575 = 0.4375.
    table = np.zeros((2, CS.num_classes))
    a = CS.encode("A")[0]
    table[:, 0] = 0.45
    table[:, a] = 0.35
    table[:, CS.encode("B")[0]] = 0.20
    probs = table[None]
    [(greedy_ids, _)] = greedy_decode(probs)
    assert greedy_ids == []  # best single path: blank, blank (0.2025)
    [(ids, conf)] = beam_decode(probs, beam_width=8)
    assert CS.decode(ids) == "A"
    assert conf == pytest.approx(0.4375)


def test_a_wide_beam_finds_the_likeliest_label_and_its_probability_over_all_alignments():
    """With a beam wide enough to keep every prefix, the search is exact: against brute force over
    all 4^5 paths, it answers the label of highest total probability, and that total."""
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4) * 0.5, size=(6, 5))
    for b, (ids, conf) in enumerate(beam_decode(probs, beam_width=4**5)):
        totals: dict[tuple[int, ...], float] = {}
        for path in itertools.product(range(4), repeat=5):
            totals[collapse(path)] = totals.get(collapse(path), 0.0) + np.prod(probs[b, range(5), path])
        best = max(totals, key=totals.get)
        assert tuple(ids) == best and conf == pytest.approx(totals[best], rel=1e-9)
    # a narrow beam prunes alignments: it never claims more than the label's probability over all of them
    many = rng.dirichlet(np.ones(CS.num_classes) * 0.3, size=(5, 8))
    for i, (ids, conf) in enumerate(beam_decode(many, beam_width=4)):
        assert 0 < conf <= label_probability(many[i:i + 1], [ids])[0] * (1 + 1e-6)


def test_mask_restricts_output():
    probs = one_hot_path("A-1", sharpness=0.6)
    mask = CS.mask("0123456789")
    masked = probs * mask
    masked /= masked.sum(-1, keepdims=True)
    [(ids, _)] = greedy_decode(masked)
    assert set(CS.decode(ids)) <= set("0123456789")
    with pytest.raises(ValueError):
        CS.mask("Z")


def test_case_folding_merges_each_letters_two_forms_before_decoding():
    from pipeline.read.inference import decode_texts

    mixed = Charset("0123aAbB")
    # every frame splits its mass between 'a' and 'A': neither form wins alone, together they beat '0'
    probs = np.zeros((1, 3, mixed.num_classes))
    a, upper_a, zero = mixed.encode("a")[0], mixed.encode("A")[0], mixed.encode("0")[0]
    probs[0, :, a], probs[0, :, upper_a], probs[0, :, zero] = 0.3, 0.3, 0.4
    assert decode_texts(probs, mixed, ctc=True)[0][0] == "0"
    (upper, p_upper), = decode_texts(probs, mixed, ctc=True, case="upper")
    (lower, p_lower), = decode_texts(probs, mixed, ctc=True, case="lower")
    assert (upper, lower) == ("A", "a") and p_upper == pytest.approx(p_lower)
    # a single-case model answers in the asked case
    assert decode_texts(one_hot_path("A-B"), CS, ctc=True, case="lower")[0][0] == "ab"
