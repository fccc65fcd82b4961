"""Image -> model input: `Preprocess`, the one function that training, evaluation, prediction,
serving and the ONNX path all use. The checkpoint records its settings.

Any input is accepted: a path, bytes, a PIL image or a numpy array, of any mode (RGB, RGBA, L,
LA, P, 1, I;16, I, F) and size. Transparency is composited onto white, 16-bit and float images
are scaled to 8 bits, then the image is converted to the model's channels and resized to its
input size (bilinear, with antialiasing when shrinking).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from PIL import Image

from pipeline.data.images import load_image

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Preprocess:
    height: int
    width: int
    channels: int  # 1 or 3
    mean: float = 0.5
    std: float = 0.5
    keep_aspect: bool = False  # checkpoints written before it squashed every image to height x width
    resample: str = "bilinear"  # bilinear | lanczos (ddddocr's)

    @classmethod
    def of(cls, settings) -> "Preprocess":
        """The input of a model's settings (height, width, channels, keep_aspect; an arch may
        set its own mean, std and resample, as ddddocr's trunk does)."""
        return cls(settings.height, settings.width, settings.channels, keep_aspect=settings.keep_aspect,
                   mean=getattr(settings, "mean", 0.5), std=getattr(settings, "std", 0.5),
                   resample=getattr(settings, "resample", "bilinear"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """The settings a checkpoint records, checked: ValueError names what is wrong."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocess is {type(d).__name__}, not a mapping")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown preprocess key {unknown[0]!r} (a checkpoint of a newer version?)")
        try:
            preprocess = cls(**d)
        except TypeError as e:  # a required key missing
            raise ValueError(f"preprocess: {e}") from None
        preprocess.check()
        return preprocess

    def check(self) -> None:
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        problems = [
            (isinstance(self.height, int) and 1 <= self.height <= 1024, f"height {self.height!r} (1 to 1024)"),
            (isinstance(self.width, int) and 1 <= self.width <= 4096, f"width {self.width!r} (1 to 4096)"),
            (self.channels in (1, 3) and isinstance(self.channels, int), f"channels {self.channels!r} (1 or 3)"),
            (number(self.mean), f"mean {self.mean!r}"),
            (number(self.std) and self.std > 0, f"std {self.std!r}"),
            (isinstance(self.keep_aspect, bool), f"keep_aspect {self.keep_aspect!r}"),
            (self.resample in RESAMPLE, f"resample {self.resample!r} ({' or '.join(RESAMPLE)})"),
        ]
        bad = [what for ok, what in problems if not ok]
        if bad:
            raise ValueError(f"preprocess: bad {bad[0]}")

    def __call__(self, image, distortion=None) -> np.ndarray:
        """One image -> (channels, height, width) float32, normalised. `distortion` (training only,
        pipeline/training/augment.py) distorts it around the resize."""
        pil = to_model_mode(load_image(image), self.channels)
        box = None
        if distortion is not None:
            pil, box = distortion.before_resize(pil)
        width = self.width
        if self.keep_aspect:  # the height fixed, the width as the aspect ratio gives, up to self.width
            w, h = (box[2] - box[0], box[3] - box[1]) if box else pil.size
            width = max(1, min(self.width, round(w * self.height / h)))
        pil = pil.resize((width, self.height), RESAMPLE[self.resample], box=box)
        arr = distortion.after_resize(pil) if distortion is not None else np.asarray(pil, dtype=np.float32)
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if width < self.width:  # pad on the right with the last column: no edge the model could read
            arr = np.pad(arr, ((0, 0), (0, 0), (0, self.width - width)), mode="edge")
        return (arr * (1 / 255) - self.mean) * (1 / self.std)

    def batch(self, images) -> np.ndarray:
        return np.stack([self(im) for im in images]) if images else np.zeros(
            (0, self.channels, self.height, self.width), np.float32)


def to_model_mode(pil: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> 'L' (channels 1) or 'RGB' (channels 3)."""
    if pil.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(pil, dtype=np.float64)
        scale = 1 / 257 if pil.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        if pil.mode == "F" and arr.max(initial=0) <= 1.0:
            scale = 255.0
        pil = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8))
    if pil.mode == "P":
        pil = pil.convert("RGBA" if "transparency" in pil.info else "RGB")
    if pil.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", pil.size, (255, 255, 255, 255))
        pil = Image.alpha_composite(background, pil.convert("RGBA"))
    target = "L" if channels == 1 else "RGB"
    return pil if pil.mode == target else pil.convert(target)
