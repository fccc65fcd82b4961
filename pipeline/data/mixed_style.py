"""The `mixed` synthetic style: captchas that vary the way real sites' do, for a general reader.

Each image draws, from its own seeded stream: a font, a size (about 60x25 to 300x100 pixels),
background (solid, gradient or speckled; light or dark) and contrasting text colours, each
letter's case (upper or lower: the label keeps the charset's case, so the model learns to read
letters case-insensitively), per-character size, rotation, offset and spacing (overlapping at
times), noise dots, lines and arcs, a perspective or wave warp, and blur. One image in five is
instead the `captcha` package's style at a random size and font.

The fonts are files: by default GENERAL_FONTS, 35 faces of 13 families (the font `captcha`
bundles, Debian's DejaVu Sans and Liberation Mono and Sans Narrow, and nine families from PyPI font
wheels; pipeline/system_files.py says where each comes from). benchmarks/yardstick.py renders its
unseen styles with other fonts, which the general model must never see (YARDSTICK_FONTS).
"""
from __future__ import annotations

import io
import math
import random
from functools import lru_cache

import captcha.image
import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from pipeline.data.captcha_style import Renderer
from pipeline.system_files import DEJAVU, LIBERATION, pypi_fonts

GENERAL_FONTS = [
    *captcha.image.DEFAULT_FONTS,
    f"{DEJAVU}/DejaVuSans.ttf", f"{DEJAVU}/DejaVuSans-Bold.ttf", f"{DEJAVU}/DejaVuSans-Oblique.ttf",
    f"{DEJAVU}/DejaVuSans-BoldOblique.ttf", f"{DEJAVU}/DejaVuSansCondensed.ttf",
    f"{DEJAVU}/DejaVuSansCondensed-Bold.ttf", f"{DEJAVU}/DejaVuSansMono.ttf", f"{DEJAVU}/DejaVuSansMono-Bold.ttf",
    f"{DEJAVU}/DejaVuSans-ExtraLight.ttf",
    f"{LIBERATION}/LiberationMono-Regular.ttf", f"{LIBERATION}/LiberationMono-Bold.ttf",
    f"{LIBERATION}/LiberationMono-Italic.ttf", f"{LIBERATION}/LiberationSansNarrow-Regular.ttf",
    f"{LIBERATION}/LiberationSansNarrow-Bold.ttf", f"{LIBERATION}/LiberationSansNarrow-Italic.ttf",
    *pypi_fonts(),  # nine more families, from PyPI font wheels
]
# Serif faces and the wide Liberation Sans: the yardstick's unseen styles are drawn with these.
YARDSTICK_FONT = {
    "dejavu-serif": f"{DEJAVU}/DejaVuSerif.ttf", "dejavu-serif-bold": f"{DEJAVU}/DejaVuSerif-Bold.ttf",
    "liberation-serif": f"{LIBERATION}/LiberationSerif-Regular.ttf",
    "liberation-serif-bold": f"{LIBERATION}/LiberationSerif-Bold.ttf",
    "liberation-sans": f"{LIBERATION}/LiberationSans-Regular.ttf",
    "liberation-sans-bold": f"{LIBERATION}/LiberationSans-Bold.ttf",
}
YARDSTICK_FONTS = list(YARDSTICK_FONT.values())


@lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _colour(rng: random.Random, lo: int = 0, hi: int = 255) -> tuple[int, int, int]:
    return tuple(rng.randint(lo, hi) for _ in range(3))


def _contrasting(rng: random.Random, background: tuple[int, int, int], least: float = 100) -> tuple[int, int, int]:
    for _ in range(50):
        colour = _colour(rng)
        if abs(_luminance(colour) - _luminance(background)) >= least:
            return colour
    return (0, 0, 0) if _luminance(background) > 127 else (255, 255, 255)


def _background(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int]]:
    """A solid, gradient or speckled background, and its mean colour."""
    light = rng.random() < 0.75
    base = _colour(rng, 170, 255) if light else _colour(rng, 0, 90)
    kind = rng.random()
    if kind < 0.5:
        return Image.new("RGB", size, base), base
    if kind < 0.8:  # a horizontal gradient between two colours of the same lightness
        other = _colour(rng, 170, 255) if light else _colour(rng, 0, 90)
        ramp = Image.linear_gradient("L").rotate(90, expand=True).resize(size)
        return Image.composite(Image.new("RGB", size, base), Image.new("RGB", size, other), ramp), base
    grain = np.random.default_rng(rng.getrandbits(64)).normal(128, rng.uniform(10, 40), (size[1], size[0]))
    speckle = Image.fromarray(np.clip(grain, 0, 255).astype(np.uint8)).convert("RGB")  # (PIL's effect_noise is unseeded)
    tinted = Image.blend(Image.new("RGB", size, base), speckle, rng.uniform(0.1, 0.3))
    return tinted, base


def _glyph(char: str, font: ImageFont.FreeTypeFont, colour, angle: float) -> Image.Image:
    left, top, right, bottom = font.getbbox(char)
    tile = Image.new("RGBA", (right - left + 4, bottom - top + 4), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((2 - left, 2 - top), char, font=font, fill=(*colour, 255))
    return tile.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)


def _noise(rng: random.Random, image: Image.Image, ink) -> None:
    draw = ImageDraw.Draw(image)
    w, h = image.size
    for _ in range(rng.choice([0, 0, 1, 2, 3, 4])):  # lines across
        colour = ink if rng.random() < 0.5 else _colour(rng)
        draw.line([(rng.uniform(0, w * 0.3), rng.uniform(0, h)), (rng.uniform(w * 0.7, w), rng.uniform(0, h))],
                  fill=colour, width=rng.randint(1, 3))
    for _ in range(rng.choice([0, 0, 1, 2])):  # arcs
        x0, y0 = rng.uniform(-w * 0.2, w * 0.5), rng.uniform(-h * 0.5, h * 0.5)
        box = [x0, y0, x0 + rng.uniform(w * 0.4, w * 1.2), y0 + rng.uniform(h * 0.5, h * 1.5)]
        draw.arc(box, rng.uniform(0, 180), rng.uniform(180, 360), fill=ink if rng.random() < 0.5 else _colour(rng),
                 width=rng.randint(1, 3))
    dots = int(w * h * rng.choice([0, 0, 0.002, 0.01, 0.03]))
    for _ in range(dots):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.choice([0, 0, 1, 1, 2])
        draw.ellipse([x - r, y - r, x + r, y + r], fill=ink if rng.random() < 0.3 else _colour(rng))


def _warp(rng: random.Random, image: Image.Image, fill) -> Image.Image:
    w, h = image.size
    kind = rng.random()
    if kind < 0.25:  # perspective: each corner moved a little
        jitter = [rng.uniform(-0.08, 0.08) * (w if i % 2 == 0 else h) for i in range(8)]
        corners = [0, 0, w, 0, w, h, 0, h]
        return image.transform((w, h), Image.Transform.QUAD, [c + j for c, j in zip(corners, jitter)],
                               resample=Image.Resampling.BILINEAR, fillcolor=fill)
    if kind < 0.5:  # a wave: columns shifted up and down
        amplitude, period, phase = rng.uniform(1, h * 0.08), rng.uniform(w * 0.3, w * 1.5), rng.uniform(0, 6.3)
        out = Image.new("RGB", (w, h), fill)
        for x in range(0, w, 2):
            dy = round(amplitude * math.sin(2 * math.pi * x / period + phase))
            out.paste(image.crop((x, 0, x + 2, h)), (x, dy))
        return out
    return image


class MixedRenderer:
    """Renders a label in the `mixed` style; an image is a pure function of (text, seed, fonts)."""

    def __init__(self, fonts: list[str] | None = None):
        self.fonts = list(fonts or GENERAL_FONTS)

    def image(self, text: str, seed: int) -> Image.Image:
        rng = random.Random(seed)
        drawn = "".join(c.swapcase() if c.isalpha() and rng.random() < 0.5 else c for c in text)
        if rng.random() < 0.2:
            return self._captcha_style(rng, drawn)
        font_path = rng.choice(self.fonts)
        size = rng.randint(20, 52)
        angle_range = rng.choice([0, 8, 15, 25])
        pad_x, pad_y = rng.randint(2, 20), rng.randint(1, 12)
        spacing = rng.uniform(-0.12, 0.25)
        # the background's colours come first (from a stream of their own), the text's against them
        background_seed = rng.getrandbits(64)
        _, base = _background(random.Random(background_seed), (1, 1))
        ink = _contrasting(rng, base)
        glyphs = []
        per_char_colour = rng.random() < 0.3
        for c in drawn:
            font = _font(font_path, max(10, round(size * rng.uniform(0.85, 1.15))))
            colour = _contrasting(rng, base) if per_char_colour else ink
            glyphs.append(_glyph(c, font, colour, rng.uniform(-angle_range, angle_range)))
        step = [max(1, round(g.width * (1 + spacing))) for g in glyphs]
        width = sum(step[:-1]) + glyphs[-1].width + 2 * pad_x
        height = max(g.height for g in glyphs) + 2 * pad_y
        image, _ = _background(random.Random(background_seed), (width, height))
        x = pad_x
        for g, s in zip(glyphs, step):
            y = (height - g.height) // 2 + round(rng.uniform(-0.12, 0.12) * size)
            image.paste(g, (x, max(0, min(height - g.height, y))), g)
            x += s
        _noise(rng, image, ink)
        image = _warp(rng, image, base)
        if rng.random() < 0.4:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
        scale = rng.uniform(0.8, 1.25)  # then a size real sites use: about 60x25 to 300x100
        target_h = max(25, min(100, round(height * scale)))
        target_w = max(60, min(300, round(width * target_h / height)))
        return image.resize((target_w, target_h), Image.Resampling.BILINEAR)

    def _captcha_style(self, rng: random.Random, text: str) -> Image.Image:
        height = rng.randint(40, 90)
        width = max(60, min(300, round(height * len(text) * rng.uniform(0.55, 0.9))))
        sizes = [round(height * f) for f in (0.65, 0.8, 0.9)]
        renderer = Renderer(width, height, [rng.choice(self.fonts)], sizes)
        return renderer.image(text, rng.getrandbits(64))

    def png(self, text: str, seed: int) -> bytes:
        out = io.BytesIO()
        self.image(text, seed).save(out, format="PNG", compress_level=1)
        return out.getvalue()
