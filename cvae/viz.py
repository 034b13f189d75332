"""Image grids: one implementation for notebooks, callbacks and scripts."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from cvae.models.networks import unit_range


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
