"""Image grids: one implementation for notebooks, callbacks and scripts."""

from __future__ import annotations

import os
from pathlib import Path

import torch
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


def interleave_rows(inputs: torch.Tensor, outputs: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """A batch to grid with `nrow` columns: a row of inputs, then the row of their outputs, ...

    Keeps the largest multiple of `nrow` images (at least one row).
    """
    columns = min(nrow, len(inputs))
    keep = len(inputs) // columns * columns
    pairs = torch.stack([unit_range(inputs[:keep]).to(outputs), outputs[:keep]])
    return pairs.unflatten(1, (-1, columns)).transpose(0, 1).flatten(0, 2)
