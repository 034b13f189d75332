"""Convolutional encoder and decoder, mirror images of each other, plus the sampling trick."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

DOWNSAMPLING = ("stride", "maxpool")
UPSAMPLING = ("transpose", "resize")


def reparameterize(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    generator: torch.Generator | None = None,
    samples: int | None = None,
) -> torch.Tensor:
    """z = mu + sigma * eps: a sample of N(mu, sigma^2) that gradients flow through.

    `samples` draws that many per row, shape `(samples, *mu.shape)`; a (CPU) `generator`
    makes the draws the same on any device.
    """
    shape = mu.shape if samples is None else (samples, *mu.shape)
    if generator is None:
        eps = torch.randn(shape, device=mu.device, dtype=mu.dtype)
    else:
        eps = torch.randn(shape, generator=generator).to(mu)
    return mu + torch.exp(0.5 * log_var) * eps


def _padding(kernel_size: int) -> tuple[int, int]:
    """Padding and output padding that make a stride-2 (transposed) convolution halve (double)."""
    padding = (kernel_size - 1) // 2
    return padding, 2 - kernel_size + 2 * padding


def feature_size(image_size: int, num_blocks: int) -> int:
    """Side of the encoder's last feature map: one halving per block."""
    return image_size // 2**num_blocks


class ResidualBlock(nn.Module):
    """x + f(x), f two 3x3 convolutions: depth at one resolution without a harder optimisation."""

    def __init__(self, channels: int, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(2):
            layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(channels))
            if index == 0:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x + self.body(x))


class Encoder(nn.Module):
    """Conv2d blocks (channels growing with depth), each halving the image, then Linear heads.

    `downsample="stride"` halves with the convolution's stride; `"maxpool"` uses a stride-1
    convolution followed by `MaxPool2d(2)`.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        image_size: int,
        latent_dim: int,
        kernel_size: int = 4,
        downsample: str = "stride",
        batch_norm: bool = True,
        residual_blocks: int = 0,
    ) -> None:
        super().__init__()
        if downsample == "stride":
            stride, padding = 2, _padding(kernel_size)[0]
        else:  # size-keeping convolution; MaxPool2d halves
            stride, padding = 1, kernel_size // 2
        layers: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            layers.append(nn.Conv2d(previous, width, kernel_size, stride, padding))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU(inplace=True))
            if downsample == "maxpool":
                layers.append(nn.MaxPool2d(2))
            layers += [ResidualBlock(width, batch_norm) for _ in range(residual_blocks)]
            previous = width
        self.features = nn.Sequential(*layers, nn.Flatten())
        flat = previous * feature_size(image_size, len(channels)) ** 2
        self.mu = nn.Linear(flat, latent_dim)
        self.log_var = nn.Linear(flat, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.mu(h), self.log_var(h)


class ResizeConv(nn.Sequential):
    """Nearest-neighbour 2x resizing then a 3x3 convolution (padding 1), computed without
    the resized map as the stride-2 transposed convolution it equals.

    Output pixel `(2i + a, 2j + b)` sees 2x2 input pixels; per dimension the taps
    `(w0, w1, w2)` that land on one input pixel are summed first, `(w0, w1 + w2)` for even
    outputs and `(w0 + w1, w2)` for odd ones. These four 2x2 phase kernels, together, are the
    4x4 kernel `(w2, w1 + w2, w0 + w1, w0)` of a stride-2 transposed convolution with
    padding 1, which computes the four phases and interleaves them in one call (no
    `pixel_shuffle` copy): 16 instead of 36 multiply-adds per input pixel and channel pair,
    on the primitive the `transpose` decoder runs. The kernel is derived from the 3x3
    weight on every call, so gradients reach it.
    The children, applied in turn, are the reference computation and keep the checkpoint
    keys (`1.weight`, `1.bias`) of the layer from before this class.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
        )

    def transposed_weight(self) -> torch.Tensor:
        """The equivalent transposed convolution's kernel, `(C_in, C_out, 4, 4)`: the 3x3
        kernel flipped and summed over 2x2 windows of itself padded by one."""
        taps = F.pad(self[1].weight.transpose(0, 1).flip(-2, -1), (1, 1, 1, 1))
        return taps[..., :-1, :-1] + taps[..., 1:, :-1] + taps[..., :-1, 1:] + taps[..., 1:, 1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.transposed_weight(), self[1].bias, stride=2, padding=1)

    def as_transposed(self) -> nn.ConvTranspose2d:
        """A `ConvTranspose2d` holding a detached copy of the equivalent kernel: for frozen
        weights, where deriving it once is enough."""
        conv = self[1]
        transposed = nn.ConvTranspose2d(conv.in_channels, conv.out_channels, 4, 2, 1)
        transposed.to(conv.weight)
        with torch.no_grad():
            transposed.weight.copy_(self.transposed_weight())
            transposed.bias.copy_(conv.bias)
        return transposed


def doubling(in_channels: int, out_channels: int, kernel_size: int, upsample: str) -> nn.Module:
    """A layer that doubles the feature map: `transpose`, a stride-2 transposed convolution;
    `resize`, nearest-neighbour resizing then a 3x3 convolution (Odena et al. 2016,
    "Deconvolution and checkerboard artifacts": every output pixel gets the same number of
    kernel taps, so no checkerboard pattern), computed as `ResizeConv` explains."""
    if upsample == "resize":
        return ResizeConv(in_channels, out_channels)
    padding, output_padding = _padding(kernel_size)
    return nn.ConvTranspose2d(in_channels, out_channels, kernel_size, 2, padding, output_padding)


class Decoder(nn.Module):
    """Linear to the encoder's last feature map, then blocks doubling it back (`doubling`:
    transposed convolutions, or resize then convolve).

    Mirrors the encoder: one doubling per encoder block, the last one to `out_channels`
    (the likelihood's parameters: the image's channels for the Gaussians), followed by
    `head`, the parameter-free layer that turns them into the image shown in [0, 1] (a
    Sigmoid unless the likelihood says otherwise). It stays the last layer of `features`, so
    checkpoints from before `logits` existed load unchanged.
    """

    def __init__(
        self,
        out_channels: int,
        channels: Sequence[int],
        image_size: int,
        latent_dim: int,
        kernel_size: int = 4,
        batch_norm: bool = True,
        residual_blocks: int = 0,
        upsample: str = "transpose",
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        widths = list(reversed(channels))
        self.start_shape = (widths[0], *(2 * (feature_size(image_size, len(channels)),)))
        self.project = nn.Sequential(
            nn.Linear(latent_dim, widths[0] * self.start_shape[1] * self.start_shape[2]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        for width, following in pairwise(widths):
            layers += [ResidualBlock(width, batch_norm) for _ in range(residual_blocks)]
            layers.append(doubling(width, following, kernel_size, upsample))
            if batch_norm:
                layers.append(nn.BatchNorm2d(following))
            layers.append(nn.ReLU(inplace=True))
        layers += [ResidualBlock(widths[-1], batch_norm) for _ in range(residual_blocks)]
        layers.append(doubling(widths[-1], out_channels, kernel_size, upsample))
        layers.append(head or nn.Sigmoid())
        self.features = nn.Sequential(*layers)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The network before its head: what likelihoods are computed from, exact where a
        saturated Sigmoid would round to 0 or 1. Shape `(B, out_channels, H, W)`."""
        h = self.project(z).view(-1, *self.start_shape)
        return self.features[:-1](h)

    def images(self, logits: torch.Tensor) -> torch.Tensor:
        """The images in [0, 1] shown for `logits` (the head: pixel means by default)."""
        return self.features[-1](logits)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The images of latents `z` (what `decode`, sampling and export show)."""
        return self.images(self.logits(z))
