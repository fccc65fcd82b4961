"""Training-time distortions of what captcha generators vary (train.augment, train.distortions).

A training image is distorted with probability train.augment; then each distortion named in
train.distortions applies, in the fixed order of DISTORTIONS, every draw from the sample's own
random stream (pipeline/data/shards.py), so an augmented batch is the same whatever the workers.
The geometric ones work on the image as it came, before `Preprocess` resizes it to the model's
input; blur and tone on the resized image:

    slant        rotation up to 5 degrees and a shear up to 0.3
    perspective  each corner moved up to 6% of the width and 12% of the height
    mesh         a coarse grid whose columns stretch or squeeze (character spacing and overlap)
                 and whose vertices wander a few pixels (elastic)
    erase        a band across the whole width painted in the background: glyph tops or feet cut
                 off, as claptcha cuts them
    lines        one or two lines or arcs through the text, in the text's colour
    crop         up to 8% cut off each side: a small zoom and shift
    blur         a Gaussian blur, 3 times in 10
    tone         contrast and brightness jitter, pixel noise half the time
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.errors import require

BEFORE_RESIZE = ("slant", "perspective", "mesh", "erase", "lines")
DISTORTIONS = (*BEFORE_RESIZE, "crop", "blur", "tone")


@dataclass(frozen=True)
class Augment:
    probability: float  # that an image is distorted at all
    distortions: tuple[str, ...]  # names from DISTORTIONS

    @classmethod
    def of(cls, tp) -> "Augment":
        """train.augment and train.distortions, checked."""
        for i, name in enumerate(tp.distortions):
            require(name in DISTORTIONS, f"train.distortions[{i}]",
                    f"unknown distortion {name!r} (known: {', '.join(DISTORTIONS)})")
        return cls(tp.augment, tuple(tp.distortions))

    def draw(self, rng: random.Random | None) -> "Distortion | None":
        """The distortion of one image, or None (most of `rng`'s draws happen as it is applied)."""
        if rng is None or self.probability <= 0 or rng.random() >= self.probability:
            return None
        return Distortion(set(self.distortions), rng)


class Distortion:
    """One image's distortion, applied in two halves around the resize (see `Preprocess`)."""

    def __init__(self, names: set[str], rng: random.Random):
        self.names = names
        self.rng = rng

    def before_resize(self, pil: Image.Image) -> tuple[Image.Image, tuple[float, ...] | None]:
        """The image distorted at its own size, and the box of it to resize (None: all of it)."""
        for name in BEFORE_RESIZE:
            if name in self.names:
                pil = GEOMETRY[name](pil, self.rng)
        return pil, (_random_crop(pil.size, self.rng) if "crop" in self.names else None)

    def after_resize(self, pil: Image.Image) -> np.ndarray:
        """The resized image blurred and toned: a float32 array on the 0-255 scale."""
        if "blur" in self.names and self.rng.random() < 0.3:
            pil = pil.filter(ImageFilter.GaussianBlur(self.rng.uniform(0.3, 0.8)))
        arr = np.asarray(pil, dtype=np.float32)
        return _random_tone(arr, self.rng) if "tone" in self.names else arr


def background(pil: Image.Image):
    """The top-left pixel's colour: the likeliest background, for the corners a warp uncovers."""
    return pil.getpixel((0, 0))


def ink(pil: Image.Image):
    """A colour of the text: the darkest pixel's (captchas draw dark text on light grounds far more
    often than the reverse; the distortion only needs a colour that looks like part of the image)."""
    gray = np.asarray(pil.convert("L"))
    y, x = np.unravel_index(int(gray.argmin()), gray.shape)
    return pil.getpixel((int(x), int(y)))


def _slant(pil: Image.Image, rng: random.Random) -> Image.Image:
    """A small random rotation (up to 5 degrees) and shear about the centre."""
    angle, shear = math.radians(rng.uniform(-5, 5)), rng.uniform(-0.3, 0.3)
    cos, sin = math.cos(angle), math.sin(angle)
    a, b, d, e = cos, cos * shear - sin, sin, sin * shear + cos  # output -> input: rotation x shear
    cx, cy = pil.width / 2, pil.height / 2
    return pil.transform(pil.size, Image.Transform.AFFINE, (a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy),
                         Image.Resampling.BILINEAR, fillcolor=background(pil))


def _perspective(pil: Image.Image, rng: random.Random) -> Image.Image:
    """The image seen at a slant: the source quadrilateral's corners moved inward or outward."""
    w, h = pil.size
    dx, dy = 0.06 * w, 0.12 * h
    corners = [(0, 0), (0, h), (w, h), (w, 0)]  # upper left, lower left, lower right, upper right
    quad = [c for x, y in corners for c in (x + rng.uniform(-dx, dx), y + rng.uniform(-dy, dy))]
    return pil.transform(pil.size, Image.Transform.QUAD, quad, Image.Resampling.BILINEAR, fillcolor=background(pil))


def _mesh(pil: Image.Image, rng: random.Random, columns: int = 6, rows: int = 2) -> Image.Image:
    """A grid of columns x rows cells: each column's width scaled by 0.7 to 1.3 (the text's spacing
    changes, neighbours overlap or part) and each inner vertex moved up to 4% of the height."""
    w, h = pil.size
    widths = [rng.uniform(0.7, 1.3) for _ in range(columns)]
    out_x = [round(w * sum(widths[:i]) / sum(widths)) for i in range(columns + 1)]  # output column edges
    out_y = [round(h * j / rows) for j in range(rows + 1)]
    jitter = 0.04 * h
    vertex = [[(w * i / columns + (rng.uniform(-jitter, jitter) if 0 < i < columns and 0 < j < rows else 0),
                h * j / rows + (rng.uniform(-jitter, jitter) if 0 < i < columns and 0 < j < rows else 0))
               for i in range(columns + 1)] for j in range(rows + 1)]  # the source grid
    mesh = [((out_x[i], out_y[j], out_x[i + 1], out_y[j + 1]),  # quad: upper left, lower left, lower right, upper right
             (*vertex[j][i], *vertex[j + 1][i], *vertex[j + 1][i + 1], *vertex[j][i + 1]))
            for j in range(rows) for i in range(columns)]
    return pil.transform(pil.size, Image.Transform.MESH, mesh, Image.Resampling.BILINEAR, fillcolor=background(pil))


def _erase(pil: Image.Image, rng: random.Random) -> Image.Image:
    """A band 4 to 12% of the height, across the whole width, in the upper or lower third, painted
    in the background's colour: what is left of the glyphs must still read."""
    w, h = pil.size
    height = max(1, round(rng.uniform(0.04, 0.12) * h))
    top = round(rng.uniform(0.15, 0.35) * h) if rng.random() < 0.5 else round(rng.uniform(0.6, 0.8) * h)
    out = pil.copy()
    ImageDraw.Draw(out).rectangle((0, top, w, top + height), fill=background(pil))
    return out


def _lines(pil: Image.Image, rng: random.Random) -> Image.Image:
    """One or two strokes across most of the width in the text's colour: a straight line or an
    arc of an ellipse, 1 to 3% of the height thick, as noise curves are drawn."""
    w, h = pil.size
    out = pil.copy()
    draw = ImageDraw.Draw(out)
    colour, width = ink(pil), max(1, round(rng.uniform(0.01, 0.03) * h))
    for _ in range(rng.randint(1, 2)):
        if rng.random() < 0.5:
            draw.line([(rng.uniform(0, 0.2) * w, rng.uniform(0.2, 0.8) * h),
                       (rng.uniform(0.8, 1) * w, rng.uniform(0.2, 0.8) * h)], fill=colour, width=width)
        else:
            top = rng.uniform(0.1, 0.5) * h
            box = (rng.uniform(-0.2, 0.1) * w, top, rng.uniform(0.9, 1.2) * w, top + rng.uniform(0.5, 1.5) * h)
            start = rng.uniform(180, 220)
            draw.arc(box, start, start + rng.uniform(100, 140), fill=colour, width=width)
    return out


GEOMETRY = {"slant": _slant, "perspective": _perspective, "mesh": _mesh, "erase": _erase, "lines": _lines}


def _random_tone(arr: np.ndarray, rng: random.Random) -> np.ndarray:
    """Contrast and brightness jitter, and pixel noise half the time (0-255 scale)."""
    mean = float(arr.mean())
    arr = (arr - mean) * rng.uniform(0.6, 1.3) + mean + rng.uniform(-25, 25)
    if rng.random() < 0.5:
        arr = arr + np.random.default_rng(rng.getrandbits(64)).normal(0, rng.uniform(2, 10), arr.shape)
    return np.clip(arr, 0, 255).astype(np.float32)


def _random_crop(size: tuple[int, int], rng: random.Random, most: float = 0.08) -> tuple[float, ...]:
    """A box cutting up to `most` of the width/height off each side: a small random zoom and shift."""
    w, h = size
    left, right = rng.uniform(0, most) * w, rng.uniform(0, most) * w
    top, bottom = rng.uniform(0, most) * h, rng.uniform(0, most) * h
    return (left, top, w - right, h - bottom)
