"""Labels <-> class ids (CTC decoding of class probabilities is pipeline/read/decode.py).

Class 0 is the CTC blank (for the fixed-length `multihead` model: "no character at this
position"); the charset's characters map to 1..N.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def fold_text(text: str, case: str | None) -> str:
    """`text` in `case` ("upper" or "lower"); None or "keep" leaves it as it is."""
    return text.upper() if case == "upper" else text.lower() if case == "lower" else text


@dataclass(frozen=True)
class Charset:
    chars: str

    @property
    def num_classes(self) -> int:
        return len(self.chars) + 1

    @cached_property
    def _index(self) -> dict[str, int]:
        return {c: i + 1 for i, c in enumerate(self.chars)}

    def encode(self, label: str) -> list[int]:
        try:
            return [self._index[c] for c in label]
        except KeyError:
            raise ValueError(f"label {label!r} has characters not in the charset: {self.unknown(label)!r}") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 1] for i in ids if i > 0)

    def unknown(self, label: str) -> str:
        """The characters of `label` that are not in the charset, in order, once each."""
        return "".join(dict.fromkeys(c for c in label if c not in self.chars))

    def fold_case(self, probs: np.ndarray, case: str | None) -> np.ndarray:
        """(..., classes) probabilities with each letter's mass moved to its `case` ("upper" or
        "lower") form where the charset has that form: a mixed-case model read case-insensitively."""
        if case is None:
            return probs
        probs = probs.copy()
        for i, c in enumerate(self.chars, 1):
            target = c.upper() if case == "upper" else c.lower()
            j = self._index.get(target)
            if target != c and j is not None:
                probs[..., j] += probs[..., i]
                probs[..., i] = 0
        return probs

    def mask(self, allowed: str | None) -> np.ndarray | None:
        """Boolean mask over classes keeping the blank and `allowed` characters (None: all)."""
        if not allowed:
            return None
        missing = self.unknown(allowed)
        if missing:
            raise ValueError(f"characters not in the model's charset: {missing!r}")
        keep = np.zeros(self.num_classes, dtype=bool)
        keep[0] = True
        keep[self.encode(allowed)] = True
        return keep
