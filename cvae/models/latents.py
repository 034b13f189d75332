"""The model boundary's latent structure: what `encode` returns and every consumer reads.

A posterior q(z | x) is one diagonal Gaussian per latent level, the top level first (a
one-level VAE has one). Consumers outside `models/` (samplers, callbacks, generation,
metrics, export) read it through this type, never as a bare `(mu, log_var)`:

- `posterior.top`: the level that ex-post samplers fit, traversals move and interpolations
  walk (`model.decode` takes latents of this level; a model with lower levels completes
  them itself);
- `posterior.levels`: every level, for per-level statistics (active units, KL per
  dimension: `model.kl_per_dimension(posterior)` gives one tensor per level);
- `posterior.means`: every level's means side by side (`span(level)`: one level's
  columns), what `model.decode_latents` reads: reconstructions, and interpolations and
  traversals at a chosen level.

A model with more levels changes `models/` and its config only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class Gaussian(NamedTuple):
    """A diagonal Gaussian per row: means and log-variances, `(B, D)` each."""

    mu: torch.Tensor
    log_var: torch.Tensor

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Gaussian:
        """Both tensors through `function` (`.cpu()`, `.detach()`, a slice, ...)."""
        return Gaussian(function(self.mu), function(self.log_var))


@dataclass(frozen=True)
class Posterior:
    """q(z | x) of a batch: one `Gaussian` per latent level, the top level first. A level
    below the top depends on the levels above it: `priors` holds, for each level, the
    conditional prior p(z_i | z_<i) it was computed beside (None for the top, whose prior is
    the model's `prior`; empty for a one-level model)."""

    levels: tuple[Gaussian, ...]
    priors: tuple[Gaussian | None, ...] = ()

    @classmethod
    def one_level(cls, mu: torch.Tensor, log_var: torch.Tensor) -> Posterior:
        return cls((Gaussian(mu, log_var),))

    @property
    def top(self) -> Gaussian:
        """The level samplers fit and `decode` takes."""
        return self.levels[0]

    @property
    def mu(self) -> torch.Tensor:
        """The top level's means `(B, D)`: the point a traversal or interpolation moves."""
        return self.top.mu

    @property
    def log_var(self) -> torch.Tensor:
        return self.top.log_var

    @property
    def means(self) -> torch.Tensor:
        """Every level's means side by side, top first `(B, sum of level sizes)`: the latents
        `model.decode_latents` reads (each level below the top along the path of the upper
        levels' means, as `encode` computes them)."""
        return torch.cat([level.mu for level in self.levels], dim=-1)

    def span(self, level: int) -> slice:
        """The columns of `level` (0: the top) in `means`."""
        start = sum(above.mu.shape[-1] for above in self.levels[:level])
        return slice(start, start + self.levels[level].mu.shape[-1])

    def __len__(self) -> int:
        return len(self.top.mu)

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Posterior:
        """Every level's tensors (and conditional priors') through `function`."""
        return Posterior(
            tuple(level.map(function) for level in self.levels),
            tuple(None if prior is None else prior.map(function) for prior in self.priors),
        )

    @classmethod
    def cat(cls, parts: Sequence[Posterior]) -> Posterior:
        """The posteriors of several batches as one, level by level."""

        def joined(gaussians: Sequence[Gaussian | None]) -> Gaussian | None:
            if gaussians[0] is None:
                return None
            return Gaussian(
                torch.cat([g.mu for g in gaussians]), torch.cat([g.log_var for g in gaussians])
            )

        levels = zip(*(part.levels for part in parts), strict=True)
        priors = zip(*(part.priors for part in parts), strict=True)
        return cls(tuple(joined(level) for level in levels), tuple(joined(p) for p in priors))
