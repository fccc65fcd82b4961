"""The synthetic styles of `data.style`: the renderer for each, and the check that its fonts exist
and draw every character they will be asked for."""
from __future__ import annotations

from pathlib import Path

import captcha.image
from PIL import ImageFont

from pipeline.data.captcha_style import Renderer
from pipeline.data.mixed_style import GENERAL_FONTS, MixedRenderer
from pipeline.errors import ParamsError
from pipeline.params import DataParams
from pipeline.system_files import where_from


def renderer_for(data: DataParams):
    """The renderer of data.style: `captcha` (the package's style at data.width x data.height) or `mixed`."""
    if data.style == "mixed":
        return MixedRenderer(data.fonts or None)
    return Renderer.from_params(data)


def check_fonts(data: DataParams) -> None:
    """Raise ParamsError if a font of the style is missing or cannot draw a character it will be
    asked for (`mixed` draws letters in both cases)."""
    if data.style == "mixed":
        fonts, key = data.fonts or GENERAL_FONTS, "data.fonts" if data.fonts else "data.style"
        chars = "".join(dict.fromkeys(data.charset + data.charset.swapcase()))
    else:
        fonts, key, chars = data.fonts or captcha.image.DEFAULT_FONTS, "data.fonts", data.charset
    for i, path in enumerate(fonts):
        where = f"data.fonts[{i}]" if data.fonts else key
        if not Path(path).is_file():
            raise ParamsError(f"{where}: font file not found: {path} (from {where_from(path)})")
        try:
            font = ImageFont.truetype(path, 32)
        except OSError as e:
            raise ParamsError(f"{where}: cannot load font {path} ({e})") from None
        # A missing glyph renders as the font's .notdef box: the same bitmap for every such char.
        notdef = bytes(font.getmask("\U000f0000"))
        missing = [c for c in chars if bytes(font.getmask(c)) == notdef]
        if missing:
            raise ParamsError(f"data.charset: font {path} cannot draw {''.join(missing)!r}")
