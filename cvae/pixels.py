"""How 8-bit images become what a model reads and what a likelihood scores.

Data stays uint8 until it is on the model's device (a quarter of the bytes to move); there
`unit_range` scales it to [0, 1]. A continuous likelihood bounds the probability of the
8-bit values only when scored on dequantised pixels (`dequantize`); a probability of
binary images scores them as they are (`is_binary`).
"""

from __future__ import annotations

import torch


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images as floats in [0, 1]: uint8 pixels are divided by 255, floats pass through."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images


def is_binary(images: torch.Tensor) -> bool:
    """Whether uint8 images hold only 0 and 255 (or float images only 0 and 1)."""
    top = 255 if images.dtype == torch.uint8 else 1
    return bool(((images == 0) | (images == top)).all())


def dequantize(
    images: torch.Tensor, continuous: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """What a likelihood is evaluated on: for a continuous density, 8-bit images
    dequantised, (x + u) / 256 with u ~ U(0, 1), so that it bounds the probability of the
    8-bit values (Theis et al., 2016); for a probability of binary images, the images."""
    if not continuous or images.dtype != torch.uint8:
        return unit_range(images)
    noise = torch.rand(images.shape, generator=generator).to(images.device)
    return (images.float() + noise) / 256
