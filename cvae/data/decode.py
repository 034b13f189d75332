"""One image (file or PIL image) -> uint8 array (C, S, S), the same way everywhere.

Images stay 8-bit until they reach the model (which scales them to [0, 1] on its device):
a quarter of the bytes to cache, copy between processes and move to an accelerator.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# What a broken file raises while being opened, decoded or converted.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class ImageDecodeError(OSError):
    """A file that is not a readable image; the message names the file."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read a file fully (first frame of an animation), with its EXIF orientation applied."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except DECODE_ERRORS as error:
        raise ImageDecodeError(f"cannot decode image file {path}: {error}") from error


def _rgb(background: int | Sequence[int]) -> tuple[int, int, int]:
    """A background given as one grey level or three channel values, checked."""
    values = [background] * 3 if isinstance(background, int) else list(background)
    if len(values) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise ValueError(f"data.background must be 0-255 or three such values, got {background}")
    return tuple(values)


def _to_mode(image: Image.Image, mode: str, background: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode to 'RGB' or 'L', keeping 16-bit images' range instead of clipping."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):  # composite, rather than keep the hidden colours
        canvas = Image.new("RGBA", image.size, (*background, 255))
        image = Image.alpha_composite(canvas, image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)


@dataclass(frozen=True)
class Preprocess:
    """Mode conversion, then the central square (of side `crop_size`, or the short side)
    resized once, straight to `image_size`.

    The same pixels as torchvision's CenterCrop + Resize + CenterCrop, without distorting
    the aspect ratio and without a full-size intermediate for very elongated images.
    """

    image_size: int = 64
    channels: int = 3
    crop_size: int | None = None
    background: int | Sequence[int] = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "background", _rgb(self.background))

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def __call__(self, image: Image.Image, crop_size: float | None = None) -> np.ndarray:
        """`image` as a uint8 array of `shape`; `crop_size` overrides the configured one."""
        crop = crop_size or self.crop_size
        image = _to_mode(image, self.mode, self.background)
        width, height = image.size
        side = round(min(width, height, crop or math.inf))
        left, top = (width - side) // 2, (height - side) // 2
        if (side, side) != image.size:  # crop first: no pixels from outside bleed in
            image = image.crop((left, top, left + side, top + side))
        size = (self.image_size, self.image_size)
        image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)
        return np.ascontiguousarray(array.transpose(2, 0, 1) if array.ndim == 3 else array[None])

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Decode a file straight to `shape`, letting JPEGs decode at a reduced DCT scale
        (`Image.draft`) as long as the square to resize keeps at least `image_size` pixels."""
        try:
            with Image.open(path) as image:
                full_width, full_height = image.size
                side = min(full_width, full_height, self.crop_size or math.inf)
                scale = self.image_size / side
                if scale < 1:
                    wanted = (math.ceil(full_width * scale), math.ceil(full_height * scale))
                    convert = self.mode if image.mode in ("RGB", "L") else None
                    image.draft(convert, wanted)
                reduced = image.size[0] / full_width
                image.load()
                image = ImageOps.exif_transpose(image)
                crop = self.crop_size * reduced if self.crop_size else None
                return self(image, crop_size=crop)
        except DECODE_ERRORS as error:
            raise ImageDecodeError(f"cannot decode image file {path}: {error}") from error
