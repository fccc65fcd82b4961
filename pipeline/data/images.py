"""Images in: `decode_image`, the one function that reads stored or uploaded image bytes (header,
format and pixel count checked before the pixels are decoded), and `load_image` for paths, bytes,
PIL images and arrays."""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# The image formats that ingest, predict and serve accept (detected from content, not name), and the
# suffix a file of each is written with (serve --keep); folders are read by these and .jpeg.
SUFFIXES = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "WEBP": ".webp"}
FORMATS = set(SUFFIXES)
IMAGE_SUFFIXES = {*SUFFIXES.values(), ".jpeg"}
MAX_FILE_BYTES = 16 * 2**20  # an image file larger than this is refused before it is read
EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """Bytes that are not a usable image. `kind`: unreadable | format | too_large | corrupt."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> PIL image, its header checked (readable, accepted format, pixel count) but its
    pixels not yet decoded: callers can weigh what decoding will cost first."""
    if not data:
        raise ImageError("unreadable", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("too_large", f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError):
        raise ImageError("unreadable", "not an image (PNG, JPEG, GIF, BMP or WebP)") from None
    if image.format not in FORMATS:
        raise ImageError("format", f"unsupported image format {image.format}")
    width, height = image.size
    if width <= 0 or height <= 0 or (max_pixels is not None and width * height > max_pixels):
        raise ImageError("too_large", f"image of {width}x{height} pixels is over the limit of {max_pixels}")
    return image


def load_pixels(image: Image.Image) -> Image.Image:
    """Decode an `open_image` result now: truncated files fail here, not later. A photo's EXIF
    orientation is applied (a phone turned on its side stores its pixels turned)."""
    try:
        image.load()
        if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError("corrupt", f"truncated or corrupt image ({e})") from None
    return image


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """Bytes -> decoded PIL image (first frame of animations), checked in this order: readable
    header, accepted format, pixel count (from the header, before decoding), then the pixels."""
    return load_pixels(open_image(data, max_pixels))


def image_paths(folder: Path) -> list[Path]:
    """A folder's entries with an image extension, recursively, sorted; hidden ones and folders
    skipped. FIFOs and dangling links are listed: reading them (`read_image_file`) says why not."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and not p.is_dir())


def read_image_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes, at most `max_bytes`: a FIFO, a device, a dangling or looping link
    or a larger file raises ImageError (or OSError, naming the reason) before anything is read."""
    try:
        info = os.stat(path)  # follows links: what would be read
    except OSError as e:
        raise ImageError("unreadable", e.strerror or str(e)) from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageError("unreadable", "not a regular file" + (" (a directory)" if stat.S_ISDIR(info.st_mode) else ""))
    if info.st_size > max_bytes:
        raise ImageError("too_large", f"file of {info.st_size:,} bytes is over the limit of {max_bytes:,}")
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)  # a file growing since the stat stops here too
    if len(data) > max_bytes:
        raise ImageError("too_large", f"file is over the limit of {max_bytes:,} bytes")
    return data


def load_image(image) -> Image.Image:
    """Paths and bytes are decoded (`decode_image`), arrays wrapped, PIL images kept as they are."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return _from_array(image)
    if isinstance(image, (str, Path)):
        return decode_image(read_image_file(Path(image)))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    raise TypeError(f"cannot read an image from {type(image).__name__}")


def _from_array(arr: np.ndarray) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"array of shape {arr.shape} is not an image (H x W, H x W x 3 or 4)")
    if arr.dtype == np.uint16:
        arr = (arr // 257).astype(np.uint8)
    elif arr.dtype.kind == "f":
        arr = np.clip(arr * 255 if arr.max(initial=0) <= 1.0 else arr, 0, 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(arr))
