"""Image grids: one implementation for notebooks, callbacks and scripts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import make_grid, save_image

from cvae.pixels import unit_range


def visualize_batch(
    images: torch.Tensor, path: str | os.PathLike | None = None, nrow: int = 8
) -> torch.Tensor:
    """A `(C, H', W')` grid of a `(B, C, H, W)` batch (uint8, or floats in [0, 1]); saved as
    an image if `path`."""
    if images.ndim != 4:
        raise ValueError(f"expected a batch of shape (B, C, H, W), got {tuple(images.shape)}")
    grid = make_grid(unit_range(images.detach().cpu()).clamp(0, 1), nrow=nrow, padding=2)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
    return grid


def visualize_rows(
    images: torch.Tensor,
    names: Sequence[str],
    path: str | os.PathLike | None = None,
    min_row_height: int = 64,
) -> Image.Image:
    """A grid with one row per name, the name written to the left of its row: `images` hold
    `len(names)` rows of equally many images. Small images are enlarged (nearest neighbour,
    a whole factor) to rows of at least `min_row_height` pixels, so the names stay legible."""
    if len(images) % len(names):
        raise ValueError(f"{len(images)} images do not make {len(names)} equal rows")
    grid = _to_pil(visualize_batch(images, nrow=len(images) // len(names)))
    factor = max(1, min_row_height // images.shape[-2])
    grid = grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)
    row_height = grid.height / len(names)
    font = ImageFont.load_default(size=max(10, min(18, int(row_height * 0.3))))
    margin = 8 + max(int(font.getlength(name)) for name in names)
    canvas = Image.new("RGB", (grid.width + margin, grid.height), "white")
    canvas.paste(grid.convert("RGB"), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for row, name in enumerate(names):
        middle = (row + 0.5) * row_height
        draw.text((margin - 4, middle), name, fill="black", font=font, anchor="rm")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        canvas.save(path)
    return canvas


def _to_pil(image: torch.Tensor) -> Image.Image:
    array = (unit_range(image.detach().cpu()).clamp(0, 1) * 255).round().to(torch.uint8)
    array = array.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_images(
    images: torch.Tensor,
    folder: str | os.PathLike,
    names: Sequence[str | os.PathLike] | None = None,
) -> list[Path]:
    """Each image of a batch as its own PNG: `names` (extension replaced) or 0000.png, ..."""
    folder = Path(folder)
    paths = []
    for index, image in enumerate(images):
        name = Path(names[index]).with_suffix(".png") if names else Path(f"{index:04d}.png")
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _to_pil(image).save(path)
        paths.append(path)
    return paths


def save_gif(frames: torch.Tensor, path: str | os.PathLike, frame_ms: int = 120) -> None:
    """An animated GIF that plays the frames forwards then backwards, looping."""
    pictures = [_to_pil(frame) for frame in frames]
    pictures += pictures[-2:0:-1]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0)


def interleave_rows(inputs: torch.Tensor, outputs: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """A batch to grid with `nrow` columns: a row of inputs, then the row of their outputs, ...

    Keeps the largest multiple of `nrow` images (at least one row).
    """
    columns = min(nrow, len(inputs))
    keep = len(inputs) // columns * columns
    pairs = torch.stack([unit_range(inputs[:keep]).to(outputs), outputs[:keep]])
    return pairs.unflatten(1, (-1, columns)).transpose(0, 1).flatten(0, 2)
