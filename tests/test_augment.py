"""Training-time distortions: each named one changes the image, all of them are a function of the
sample's own random stream, and none leaves the model's input range or shape."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import ParamsError
from pipeline.model.preprocess import Preprocess
from pipeline.params import load_params
from pipeline.training.augment import DISTORTIONS, Augment
from tests.conftest import write_params
from tests.helpers import captcha_png as png_bytes

KEEP_ASPECT = Preprocess(32, 160, 1, keep_aspect=True)


def image() -> Image.Image:
    return Image.open(io.BytesIO(png_bytes("AB12", 3)))


def distorted(names, seed: int, preprocess: Preprocess = KEEP_ASPECT) -> np.ndarray:
    return preprocess(image(), Augment(1.0, tuple(names)).draw(random.Random(seed)))


def test_augmentation_is_a_function_of_its_random_stream():
    runs = [distorted(DISTORTIONS, seed) for seed in (1, 1, 2)]
    assert runs[0].shape == (1, 32, 160) and runs[0].dtype == np.float32
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])
    assert runs[0].min() >= -1.0 and runs[0].max() <= 1.0
    assert Augment(0.0, DISTORTIONS).draw(random.Random(1)) is None
    assert Augment(1.0, DISTORTIONS).draw(None) is None
    assert np.array_equal(KEEP_ASPECT(image(), None), KEEP_ASPECT(image()))


@pytest.mark.parametrize("name", DISTORTIONS)
def test_each_distortion_changes_the_image_and_only_it(name):
    """With one distortion named, the image differs from the undistorted one on most seeds (blur
    applies 3 times in 10), and from what the other distortions alone make of it."""
    plain = KEEP_ASPECT(image())
    changed = [not np.array_equal(distorted([name], seed), plain) for seed in range(10)]
    assert sum(changed) >= (2 if name == "blur" else 10)
    others = [n for n in DISTORTIONS if n != name]
    assert any(not np.array_equal(distorted(others, s), distorted(DISTORTIONS, s)) for s in range(10))
    rgb = distorted([name], 3, Preprocess(64, 192, 3))
    assert rgb.shape == (3, 64, 192) and -1.0 <= rgb.min() and rgb.max() <= 1.0


def test_geometric_distortions_keep_the_text_mostly_in_place():
    """A distortion is a perturbation, not a new image: on average the distorted input stays
    closer to the plain one than to another captcha's."""
    plain, other = KEEP_ASPECT(image()), KEEP_ASPECT(Image.open(io.BytesIO(png_bytes("XY89", 4))))
    for name in ("slant", "perspective", "mesh", "erase", "lines", "crop"):
        near = np.mean([np.abs(distorted([name], s) - plain).mean() for s in range(8)])
        assert near < np.abs(other - plain).mean(), name


def test_an_unknown_distortion_is_one_line(tmp_path):
    params = load_params(write_params(tmp_path, {"train": {"distortions": ["slant", "swirl"]}}))
    with pytest.raises(ParamsError, match=r"^train.distortions\[1\]: unknown distortion 'swirl'"):
        Augment.of(params.train)
