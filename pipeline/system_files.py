"""Every file the project reads from outside the repo, and the set-up step that provides it.

- Debian packages, installed (pinned where they decide the bytes of the data) by setup/debian.sh,
  which `make install` runs: `DEBIAN` maps each absolute path to its package.
- Font wheels from PyPI, pinned in constraints.txt and installed with the project: `pypi_font`
  finds a font inside its installed package, so nothing depends on where the venv lies.

No other module names an absolute system path (tests/test_system_files.py checks it, and that
each package here is one that setup/debian.sh installs).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEJAVU = "/usr/share/fonts/truetype/dejavu"
LIBERATION = "/usr/share/fonts/truetype/liberation"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

DEBIAN = {
    **{f"{DEJAVU}/{name}": "fonts-dejavu-core" for name in (
        "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
        "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf")},
    **{f"{DEJAVU}/{name}": "fonts-dejavu-extra" for name in (
        "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf", "DejaVuSansCondensed.ttf",
        "DejaVuSansCondensed-Bold.ttf", "DejaVuSans-ExtraLight.ttf")},
    **{f"{LIBERATION}/{name}": "fonts-liberation" for name in (
        "LiberationMono-Regular.ttf", "LiberationMono-Bold.ttf", "LiberationMono-Italic.ttf",
        "LiberationSansNarrow-Regular.ttf", "LiberationSansNarrow-Bold.ttf", "LiberationSansNarrow-Italic.ttf",
        "LiberationSerif-Regular.ttf", "LiberationSerif-Bold.ttf", "LiberationSans-Regular.ttf",
        "LiberationSans-Bold.ttf")},
    CHROMIUM: "chromium",  # the labelling page's browser test (benchmarks/labelling.py)
    CHROMEDRIVER: "chromium-driver",
}

# PyPI package -> font files it ships (under <package>/files/); all SIL OFL 1.1 but Red Hat Display's
# own licence file (OFL too)
PYPI_FONTS = {
    "font_source_sans_pro": ["SourceSansPro-Regular.ttf", "SourceSansPro-It.ttf", "SourceSansPro-Black.ttf",
                             "SourceSansPro-Light.ttf"],
    "font_lato": ["Lato-Regular.ttf", "Lato-Bold.ttf", "Lato-Italic.ttf", "Lato-Black.ttf"],
    "font_manrope": ["Manrope-Regular.ttf", "Manrope-ExtraBold.ttf", "Manrope-Light.ttf"],
    "font_fredoka_one": ["FredokaOne-Regular.ttf"],
    "font_hanken_grotesk": ["HankenGrotesk-Regular.otf", "HankenGrotesk-BoldItalic.otf"],
    "font_fjallaone": ["FjallaOne-Regular.ttf"],
    "font_amatic_sc": ["AmaticSC-Bold.ttf"],
    "font_intuitive": ["Intuitive.ttf"],
    "font_rhd": ["RedHatDisplay-Regular.ttf", "RedHatDisplay-BlackItalic.ttf"],
}


def pypi_font(package: str, name: str) -> str:
    """The path of font `name` inside installed PyPI package `package` (its module not imported).
    A package that is missing gives a path that does not exist, which the font check names."""
    spec = importlib.util.find_spec(package)
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations \
        else Path(f"<{package} not installed: pip install -c constraints.txt -e .>")
    return str(folder / "files" / name)


def pypi_fonts() -> list[str]:
    return [pypi_font(package, name) for package, names in PYPI_FONTS.items() for name in names]


def where_from(path: str) -> str:
    """The set-up step that provides `path`, for error messages."""
    if path in DEBIAN:
        return f"Debian package {DEBIAN[path]}: setup/debian.sh (make install)"
    return "a PyPI package of pyproject.toml: make install"
