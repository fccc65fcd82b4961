"""Deterministic captcha rendering with the `captcha` package.

captcha 0.7.1 draws every random choice from the `secrets` module, which cannot be seeded.
`Renderer` points the module's `secrets` name at a seeded `random.Random` for the duration of
each call, so an image is a pure function of (text, seed, size, fonts).
"""
from __future__ import annotations

import contextlib
import io
import random

import captcha.image
from captcha.image import ImageCaptcha
from PIL import Image

from pipeline.params import DataParams


class _SeededSecrets:
    """The three functions of `secrets` that captcha.image calls, backed by one seeded Random."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)

    def choice(self, seq):
        return self._rng.choice(seq)


@contextlib.contextmanager
def _seeded(seed: int):
    original = captcha.image.secrets
    captcha.image.secrets = _SeededSecrets(seed)
    try:
        yield
    finally:
        captcha.image.secrets = original


class Renderer:
    def __init__(self, width: int, height: int, fonts: list[str] | None = None,
                 font_sizes: list[int] | None = None):
        self._captcha = ImageCaptcha(width=width, height=height, fonts=fonts or None,
                                     font_sizes=tuple(font_sizes) if font_sizes else None)

    @classmethod
    def from_params(cls, data: DataParams) -> "Renderer":
        return cls(data.width, data.height, data.fonts, data.font_sizes)

    def image(self, text: str, seed: int) -> Image.Image:
        with _seeded(seed):
            return self._captcha.generate_image(text)

    def png(self, text: str, seed: int) -> bytes:
        out = io.BytesIO()
        # compress_level 1: a third of the default's encoding time for ~15% larger files
        self.image(text, seed).save(out, format="PNG", compress_level=1)
        return out.getvalue()
