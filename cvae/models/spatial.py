"""Latent levels that are maps on the decoder's resolutions: the decoder is the top-down path.

A level `[channels, height, width]` of `model.levels` (`HVAE`, `hvae.py`) sits at the
decoder's feature map of that side (VDVAE / NVAE style). Walking the decoder top-down, at
each level's resolution, before the layers there: a conditional prior p(z_i | z_<i) from the
decoder's state (a 3x3 convolution), a posterior q(z_i | x, z_<i) from that state beside the
encoder's feature map of the same side (the bottom-up path), the latent map drawn from one of
them and added to the state through a 1x1 convolution. The decoder's own layers carry the
state on to the next resolution and to the image.

Outside this module a level is a flat vector of `channels * height * width` latents, channel
major (`latents.Posterior`'s contract): samplers, statistics and walks need nothing new.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from cvae.models.latents import Gaussian
from cvae.models.networks import Decoder, ResidualBlock, ResizeConv, feature_size

Choose = Callable[[int, Gaussian | None, Gaussian], torch.Tensor]
# The decoder layers before which the levels at the current resolution join the state.
_DOUBLING = (nn.ConvTranspose2d, ResizeConv)
_JOIN_BEFORE = (ResidualBlock, *_DOUBLING)


def decoder_sides(image_size: int, hidden_channels: Sequence[int]) -> dict[int, int]:
    """The side of each feature map the decoder computes before the image, with its width
    (channels): the encoder's maps of the same sides have the same widths (mirror images)."""
    start = feature_size(image_size, len(hidden_channels))
    widths = list(reversed(hidden_channels))
    return {start * 2**index: width for index, width in enumerate(widths)}


def check_spatial_levels(
    levels: Sequence[Sequence[int]], image_size: int, hidden_channels: Sequence[int]
) -> list[tuple[int, int]]:
    """`(channels, side)` of each level, or a one-line error naming the key: every level must
    be square, on one of the decoder's resolutions, and no coarser than the level above."""
    sides = decoder_sides(image_size, hidden_channels)
    names = ", ".join(f"{side}x{side}" for side in sides)
    shapes: list[tuple[int, int]] = []
    for index, (channels, height, width) in enumerate(levels, start=1):
        if height != width or height not in sides:
            raise ValueError(
                f"model.levels: level {index} is {height}x{width}, not one of the decoder's "
                f"resolutions for data.image_size={image_size} and model.hidden_channels="
                f"{list(hidden_channels)} ({names}: the image size halved once per block, "
                "which the levels' sides must divide)"
            )
        if shapes and height < shapes[-1][1]:
            raise ValueError(
                f"model.levels: level {index} ({height}x{width}) is coarser than the level "
                "above it: list the levels top-down, coarse to fine"
            )
        shapes.append((channels, height))
    return shapes


def bottom_up(
    features: nn.Sequential, x: torch.Tensor
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The encoder's flat features of images `x` (what the top level's heads read) and its
    feature map of each side (the last one computed there), in one pass of its layers
    (`Encoder.features`, which ends in a `Flatten`)."""
    maps: dict[int, torch.Tensor] = {}
    *layers, flatten = features
    for layer in layers:
        x = layer(x)
        maps[x.shape[-1]] = x
    return flatten(x), maps


class SpatialTopDown(nn.Module):
    """The levels below the top as latent maps (`shapes`: `(channels, side)` each, top-down)
    on a decoder whose map of each side has `widths[side]` channels: for each level a prior,
    a posterior and a merge convolution. `walk` runs the decoder with them."""

    def __init__(self, shapes: Sequence[tuple[int, int]], widths: dict[int, int]) -> None:
        super().__init__()
        self.shapes = list(shapes)
        self.sizes = [channels * side * side for channels, side in self.shapes]
        self.priors, self.posteriors, self.merges = (
            nn.ModuleList(),
            nn.ModuleList(),
            nn.ModuleList(),
        )
        for channels, side in self.shapes:
            width = widths[side]
            self.priors.append(nn.Conv2d(width, 2 * channels, 3, padding=1))
            self.posteriors.append(nn.Conv2d(2 * width, 2 * channels, 3, padding=1))
            self.merges.append(nn.Conv2d(channels, width, 1))

    def walk(
        self,
        decoder: Decoder,
        condition: Callable[[torch.Tensor], torch.Tensor],
        features: tuple[torch.Tensor, dict[int, torch.Tensor]] | None,
        top: torch.Tensor,
        choose: Choose,
        decode: bool = True,
        logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, list[Gaussian | None], list[Gaussian]]:
        """The decoder from top-level latents `top` (`condition` adds a class code), each
        level joining its state at its resolution: `choose(level, posterior, prior)` gives
        the level's latents (flat, with `top`'s leading dimensions), the posterior from the
        bottom-up `features` (None when generating). Returns the logits (None without
        `decode`: the walk stops after the last level), every level's latents side by side,
        the posteriors and the priors. `logits_of` (another computation of the decoder, as
        `TopDown.walk` takes) cannot apply: the maps join the decoder's layers."""
        if logits_of is not None:
            raise ValueError(
                "decoder= applies to models whose decoder reads every latent at its input; "
                "this one's latent maps join the decoder's layers"
            )
        lead = top.shape[:-1]
        h = decoder.project(condition(top.flatten(0, -2))).view(-1, *decoder.start_shape)
        maps = None if features is None else _repeated(features[1], len(h))
        chosen, posteriors, priors = [top], [], []
        pending = list(range(len(self.shapes)))
        side = decoder.start_shape[-1]  # a plain number: the walk traces to a fixed graph
        for layer in list(decoder.features)[:-1]:
            if not (pending or decode):
                break
            while (
                pending and isinstance(layer, _JOIN_BEFORE) and self.shapes[pending[0]][1] == side
            ):
                index = pending.pop(0)
                reading = None if maps is None else maps[side]
                h, latents, posterior, prior = self._join(index, h, reading, lead, choose)
                chosen.append(latents)
                posteriors.append(posterior)
                priors.append(prior)
            h = layer(h)
            side *= 2 if isinstance(layer, _DOUBLING) else 1
        logits = h.unflatten(0, lead) if decode else None
        return logits, torch.cat(chosen, dim=-1), posteriors, priors

    def _join(
        self,
        index: int,
        h: torch.Tensor,
        bottom_up: torch.Tensor | None,
        lead: torch.Size,
        choose: Choose,
    ) -> tuple[torch.Tensor, torch.Tensor, Gaussian | None, Gaussian]:
        """Level `index` at the decoder's state `h`: its prior from `h`, its posterior from
        `h` beside the encoder's map of that side (`bottom_up`; None: no posterior), its
        latents `choose`n, and the state with them added."""
        prior = _gaussian(self.priors[index](h), lead)
        posterior = None
        if bottom_up is not None:
            posterior = _gaussian(self.posteriors[index](torch.cat([h, bottom_up], dim=1)), lead)
        latents = choose(index + 1, posterior, prior)
        channels, side = self.shapes[index]
        h = h + self.merges[index](latents.reshape(-1, channels, side, side))
        return h, latents, posterior, prior


def _gaussian(output: torch.Tensor, lead: torch.Size) -> Gaussian:
    """A level's mean and log-variance maps from a convolution's `2 * channels` outputs, as
    flat vectors (channel major) with leading dimensions `lead`."""
    mu, log_var = output.chunk(2, dim=1)
    return Gaussian(mu.reshape(*lead, -1), log_var.reshape(*lead, -1))


def _repeated(maps: dict[int, torch.Tensor], rows: int) -> dict[int, torch.Tensor]:
    """The bottom-up maps of a batch for `rows` = samples x batch rows (sample major)."""
    return {
        side: m if len(m) == rows else m.expand(rows // len(m), *m.shape).flatten(0, 1)
        for side, m in maps.items()
    }
