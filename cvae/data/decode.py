"""One image (file or PIL image) -> float tensor (C, H, W) in [0, 1], the same way everywhere."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps


class ImageDecodeError(OSError):
    """A file that is not a readable image; the message names the file."""


def open_image(path: str | os.PathLike) -> Image.Image:
    """Read a file fully (first frame of an animation), with its EXIF orientation applied."""
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageDecodeError(f"cannot decode image file {path}: {error}") from error


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL mode to 'RGB' or 'L', keeping 16-bit images' range instead of clipping."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):  # composite on black rather than keep hidden colours
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    size_w, size_h = min(size, width), min(size, height)
    left, top = (width - size_w) // 2, (height - size_h) // 2
    return image.crop((left, top, left + size_w, top + size_h))


@dataclass(frozen=True)
class Preprocess:
    """Mode conversion, optional center crop, resize of the short side, center crop to square.

    Square output without distorting the aspect ratio, as torchvision's Resize + CenterCrop.
    """

    image_size: int = 64
    channels: int = 3
    crop_size: int | None = None

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = _to_mode(image, "L" if self.channels == 1 else "RGB")
        if self.crop_size:
            image = _center_crop(image, self.crop_size)
        width, height = image.size
        scale = self.image_size / min(width, height)
        target = tuple(max(self.image_size, round(side * scale)) for side in (width, height))
        if target != image.size:
            image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=3.0)
        image = _center_crop(image, self.image_size)
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
