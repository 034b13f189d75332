"""What a trained model is for: new images, reconstructions and walks between images.

`UserAPI` is a mixin of `CVAE` (`cvae.py`): it uses the model's `encode`, `decode`,
`decoder`, `conditioning`, `prior` and `class_indices`, and adds no state. Every method runs
in eval mode without gradients (`evaluating`) and leaves the model as it found it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

# What the user-facing methods take as labels: one class (index or name) for every image, or
# one per image.
Labels = int | str | Sequence[int | str] | torch.Tensor | None


class LatentSource(Protocol):
    """Where the latents of new images come from: `cvae.samplers`' objects (the prior, a
    fitted mixture, a second VAE) keep this; the model never imports them."""

    def latents(
        self,
        model: nn.Module,
        n: int,
        generator: torch.Generator | None,
        labels: torch.Tensor | None,
        temperature: float,
    ) -> torch.Tensor: ...


@contextmanager
def evaluating(module: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics) and no gradients, then back as it was."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def level_temperatures(temperature: float | Sequence[float], levels: int) -> list[float]:
    """One sampling temperature per latent level, top first: a number for every level, or a
    list of one per level (a one-line error naming the key otherwise)."""
    if isinstance(temperature, (int, float)):
        return [float(temperature)] * levels
    values = [float(t) for t in temperature]
    if len(values) != levels:
        raise ValueError(
            f"temperature={values} has {len(values)} value(s) for a model of "
            f"{levels} latent level(s): give one number, or one per level"
        )
    return values


def check_level(level: object, levels: int) -> None:
    """A latent level's index (0: the top), or a one-line error naming the key."""
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < levels:
        raise ValueError(
            f"level={level!r}: this model has {levels} latent level(s), 0 (the top) to {levels - 1}"
        )


def walk(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Points from `a` to `b` at fractions `t` `(steps, 1)`: a straight line, or a great
    circle (`spherical`); parallel vectors' great circle is the line."""
    if spherical:
        omega = torch.arccos(torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1))
        if omega.abs() > 1e-6:
            return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / omega.sin()
    return (1 - t) * a + t * b


class UserAPI:
    """Sampling (from the prior or a fitted ex-post sampler), per-class grids,
    reconstructions and interpolations: `CVAE`'s user API."""

    def sample(
        self,
        n: int,
        temperature: float | Sequence[float] = 1.0,
        generator: torch.Generator | None = None,
        labels: Labels = None,
        sampler: LatentSource | None = None,
    ) -> torch.Tensor:
        """`n` new images decoded from latents of the prior (`sample_latents`), or of a
        `sampler` (`cvae.samplers`: `prior`, or a fitted `gmm`, `two_stage`); a conditional
        model draws the class `labels` (one for all, or one per image; indices or names).
        `temperature` scales the spread of the top level's draws; a model with several
        latent levels takes one per level too (a list, top first), the levels below drawn
        from their conditional priors."""
        temperatures = level_temperatures(temperature, self.latent_levels)
        labels = self.class_indices(labels, n)
        if sampler is None:
            z = self.sample_latents(n, temperatures[0], generator)
        else:
            z = sampler.latents(self, n, generator, labels, temperatures[0]).to(self.device)
        with evaluating(self):
            return self.decode_drawn(z, labels, generator, temperatures[1:])

    def decode_drawn(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator | None,
        temperatures: Sequence[float],
    ) -> torch.Tensor:
        """Images of new top-level latents `z`: here `decode`; a model with levels below
        draws them from their conditional priors at `temperatures` first."""
        return self.decode(z, labels)

    def sample_latents(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`n` latents `(n, latent_dim)` from the prior, on the model's device, drawn with a
        CPU `generator`: `standard` N(0, temperature^2 I) (the draws of models from before
        priors, bit for bit); a mixture picks a component by its weight and scales that
        component's spread by `temperature`. The same for every class."""
        with evaluating(self):
            return self.prior.sample(n, generator, temperature).to(self.device)

    def sample_classes(
        self,
        per_class: int,
        classes: Sequence[int | str] | None = None,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """A conditional model's samples, `per_class` of each of `classes` (default: all), row
        after row: the same `per_class` latents for every class, so a column keeps its style."""
        wanted = range(len(self.class_names)) if classes is None else classes
        labels = self.class_indices(list(wanted), key="classes")
        if labels is None:
            raise ValueError(
                "sample_classes needs a conditional model (trained with model.conditional=true)"
            )
        z = self.sample_latents(per_class, temperature, generator).repeat(len(labels), 1)
        with evaluating(self):
            return self.decode(z, labels.repeat_interleave(per_class))

    def reconstruct(self, x: torch.Tensor, labels: Labels = None) -> torch.Tensor:
        """Images decoded from their posterior means: the model's best guess of `x`. A
        conditional model decodes with the classes the images were encoded with."""
        labels = self.class_indices(labels, len(x))
        with evaluating(self):
            return self.decode_latents(self.encode(x.to(self.device), labels).means, labels)

    def interpolate(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        steps: int = 8,
        spherical: bool = False,
        labels: Labels = None,
        level: int = 0,
    ) -> torch.Tensor:
        """`steps` images decoded along the path between the posterior means of two images
        `(C, H, W)`: a straight line, or a great circle (`spherical`), which keeps the norm
        that latents of a Gaussian prior concentrate at. A conditional model takes the two
        images' `labels`; the class code walks from one to the other along with `z`. `level`:
        the latent level that walks (0, the top, the only one of a one-level model); the
        other levels stay at the first image's means, so the first frame is its
        reconstruction and what changes is what that level encodes."""
        check_level(level, self.latent_levels)
        labels = self.class_indices(labels, 2)
        with evaluating(self):
            posterior = self.encode(torch.stack([x1, x2]).to(self.device), labels)
            a, b = posterior.means
            part = posterior.span(level)
            t = torch.linspace(0, 1, steps, device=self.device)[:, None]
            latents = a.repeat(steps, 1)
            latents[:, part] = walk(a[part], b[part], t, spherical)
            if labels is None:
                return self.decode_latents(latents)
            return self._decode_between(latents, labels[0], labels[1], t)

    def interpolate_classes(
        self, first: int | str, second: int | str, z: torch.Tensor, steps: int = 8
    ) -> torch.Tensor:
        """A conditional model's walk from class `first` to class `second` at fixed latents
        `z` `(n, latent_dim)`: the style kept, the class changed. `n * steps` images, the
        `steps` of each latent in a row."""
        labels = self.class_indices([first, second], 2, key="labels")
        if labels is None:
            raise ValueError(
                "interpolate_classes needs a conditional model "
                "(trained with model.conditional=true)"
            )
        with evaluating(self):
            t = torch.linspace(0, 1, steps, device=self.device).repeat(len(z))[:, None]
            z = z.to(self.device).repeat_interleave(steps, dim=0)
            return self._decode_between(z, labels[0], labels[1], t)

    def _decode_between(
        self, z: torch.Tensor, first: torch.Tensor, second: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Decode `z` with class codes blended from `first`'s (t = 0) to `second`'s (t = 1)."""
        codes = self.conditioning.code(torch.stack([first, second]))
        code = (1 - t) * codes[0] + t * codes[1]
        return self.decoder(self.conditioning.decoder_input(z, code))
