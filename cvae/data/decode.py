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


def _range(array: np.ndarray) -> str:
    """`[low, high]` of an array, as few digits as tell them apart."""
    return f"[{array.min():.6g}, {array.max():.6g}]"


def _float_to_grey(image: Image.Image) -> Image.Image:
    """A float image (mode F, as float TIFFs open) as 8-bit grey: intensities in [0, 1]
    times 255. Anything else is refused: Pillow's own conversion clips, so a [0, 1] image
    came out black, and no rescaling rule fits every float image (per-image min-max
    would change each image's brightness differently)."""
    array = np.asarray(image, dtype=np.float64) * 255.0
    if not np.isfinite(array).all():
        raise ValueError("float image (mode F) holds NaN or infinite values")
    # Values that round into 0-255 are accepted: float arithmetic can overshoot [0, 1].
    if array.min() < -0.5 or array.max() >= 255.5:
        raise ValueError(
            f"float image (mode F) with values in {_range(array / 255.0)}, outside [0, 1]: "
            "scale it to [0, 1] or save it as 8- or 16-bit integers"
        )
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L")


def _integer_to_grey(image: Image.Image) -> Image.Image:
    """A 16- or 32-bit integer image as 8-bit grey. `I;16` files are scaled by their 16
    bits. Mode `I` (32-bit, as integer TIFFs open) is read as 8-bit when its values fit in
    0-255, as 16-bit when they fit in 0-65535, and refused otherwise: scaling by 32 bits
    would make any real image black, and clipping made it white."""
    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        peak = 65535.0
    elif array.min() < 0 or array.max() > 65535:
        raise ValueError(
            f"32-bit integer image (mode I) with values in {_range(array)}, outside 0-65535: "
            "save it as 8- or 16-bit (or as floats in [0, 1])"
        )
    else:
        peak = 65535.0 if array.max() > 255 else 255.0
    return Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")


def _to_mode(image: Image.Image, mode: str, background: tuple[int, int, int]) -> Image.Image:
    """Convert any PIL mode to 'RGB' or 'L', keeping 16-bit and float images' range instead
    of clipping it (or refusing one whose range has no 8-bit reading: a `ValueError`)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = _integer_to_grey(image)
    elif image.mode == "F":
        image = _float_to_grey(image)
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

    def __call__(self, image: Image.Image, full_size: tuple[int, int] | None = None) -> np.ndarray:
        """`image` as a uint8 array of `shape`.

        `full_size` is the image's size before a reduced-scale decode: the crop is placed in
        full-resolution pixels, so a reduced decode takes the same square as a full one.
        """
        image = _to_mode(image, self.mode, self.background)
        width, height = full_size or image.size
        side = min(width, height, self.crop_size or math.inf)
        left, top = (width - side) // 2, (height - side) // 2
        sx, sy = image.size[0] / width, image.size[1] / height
        box = (left * sx, top * sy, (left + side) * sx, (top + side) * sy)
        # An explicit crop comes first, as torchvision's CenterCrop + Resize: nothing outside
        # it bleeds in. Without one, resizing straight from the box is Resize + CenterCrop.
        outer = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
        if self.crop_size and outer != (0, 0, *image.size):
            image = image.crop(outer)
            box = (box[0] - outer[0], box[1] - outer[1], box[2] - outer[0], box[3] - outer[1])
        size = (self.image_size, self.image_size)
        image = image.resize(size, Image.Resampling.BILINEAR, box=box, reducing_gap=3.0)
        array = np.asarray(image, dtype=np.uint8)  # read-only: a view of Pillow's bytes
        if array.ndim == 3:
            return np.ascontiguousarray(array.transpose(2, 0, 1))  # a copy: writable
        return array[None].copy()  # writable, as torch.from_numpy wants

    def load(self, path: str | os.PathLike) -> np.ndarray:
        """Decode a file straight to `shape`, letting JPEGs decode at a reduced DCT scale
        (`Image.draft`) as long as the square to resize keeps at least `image_size` pixels."""
        try:
            with Image.open(path) as image:
                full = image.size
                scale = self.image_size / min(*full, self.crop_size or math.inf)
                if scale < 1:
                    wanted = (math.ceil(full[0] * scale), math.ceil(full[1] * scale))
                    image.draft(self.mode if image.mode in ("RGB", "L") else None, wanted)
                decoded = image.size
                image.load()
                image = ImageOps.exif_transpose(image)
                if image.size != decoded:  # rotated by its EXIF orientation
                    full = full[::-1]
                return self(image, full_size=full)
        except DECODE_ERRORS as error:
            raise ImageDecodeError(f"cannot decode image file {path}: {error}") from error
