"""`HVAE`: a hierarchical VAE, a top latent and levels below it on a top-down path.

The top level is the one-level model's latent: q(z_0 | x) from the encoder's heads and p(z_0)
the `prior` seam (`model/prior=standard|mog|vamp`). Each level below, top to bottom, has a
conditional prior p(z_i | z_<i) and a posterior q(z_i | x, z_<i) that reads the encoder's
features beside the latents above it (the Ladder VAE / NVAE / VDVAE scheme: one top-down
path shared by inference and generation), and the decoder reads every level's latent
(p(x | z_0, ..., z_L), the two-level model of Tomczak and Welling's VampPrior paper when
L = 1). With no levels below the top it is the one-level `CVAE`, layer for layer.

`levels` lists the sizes of the levels below the top, top-down (`model.levels`); each
level's prior and posterior are small MLPs of width `level_width`. The latent structure
that leaves the model is `latents.Posterior`: `encode` gives every level along the path of
the upper levels' posterior means, with the conditional prior beside each.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from cvae.models.cvae import CVAE
from cvae.models.latents import Gaussian, Posterior
from cvae.models.losses import free_bits_kl, kl_divergence, kl_per_dimension, normal_log_density
from cvae.models.networks import Decoder, reparameterize
from cvae.models.spatial import SpatialTopDown, bottom_up, check_spatial_levels, decoder_sides
from cvae.pixels import unit_range

Choose = Callable[[int, Gaussian | None, Gaussian], torch.Tensor]


def check_levels(levels: object, level_width: object) -> list[int] | list[list[int]]:
    """The levels as plain integers (vector levels: their sizes) or as plain `[channels,
    height, width]` lists (latent maps: `spatial.py`), or a one-line error naming the key."""
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise ValueError(
            "model.levels must be a list of latent sizes, or of latent map shapes [channels, "
            f"height, width], got {levels!r}"
        )
    shapes = [_shape(entry) for entry in levels]
    if any(shapes) and not all(shapes):
        raise ValueError(
            f"model.levels={_plain(levels)}: all levels are sizes (vectors) or all are "
            "[channels, height, width] (maps), not a mix"
        )
    for entry in levels:
        values = list(entry) if _shape(entry) else [entry]
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values):
            raise ValueError(
                f"model.levels={_plain(levels)}: every level needs an integer number of "
                f"latents >= 1, got {_plain(entry)!r}"
            )
    if not isinstance(level_width, int) or level_width < 1:
        raise ValueError(f"model.level_width must be an integer >= 1, got {level_width!r}")
    return [_plain(entry) for entry in levels]


def _shape(entry: object) -> bool:
    """Whether a `model.levels` entry is a map's `[channels, height, width]`."""
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
        return False
    if len(entry) != 3:
        raise ValueError(
            f"model.levels: a latent map is [channels, height, width], got {_plain(entry)}"
        )
    return True


def _plain(value: object) -> object:
    """A config value as plain lists and numbers (what errors show and checkpoints keep)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return value
    return [_plain(v) for v in value]


def check_level_warmup(steps: object, lower_levels: int, iw_samples: object) -> None:
    """`model.level_warmup_steps`: null, or one integer >= 0 per level (top first)."""
    if steps is None:
        return
    levels = lower_levels + 1
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Sequence) or len(steps) != levels:
        raise ValueError(
            f"model.level_warmup_steps must be null or a list of {levels} step "
            f"counts (one per latent level, top first), got {steps!r}"
        )
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in steps):
        raise ValueError(
            f"model.level_warmup_steps={list(steps)}: every entry must be an integer >= 0"
        )
    if iw_samples != 1:
        raise ValueError(
            "model.level_warmup_steps weighs each level's KL in the ELBO: it "
            "needs model.iw_samples=1"
        )


def _gaussian_head(inputs: int, width: int, outputs: int) -> nn.Sequential:
    """Mean and log-variance of `outputs` latents from `inputs` values, through one hidden
    layer."""
    return nn.Sequential(nn.Linear(inputs, width), nn.ReLU(), nn.Linear(width, 2 * outputs))


def _gaussian(head: nn.Module, inputs: torch.Tensor) -> Gaussian:
    mu, log_var = head(inputs).chunk(2, dim=-1)
    return Gaussian(mu, log_var)


Features = tuple[torch.Tensor, dict[int, torch.Tensor]]  # the encoder's: flat, maps by side


class TopDown(nn.Module):
    """The levels below the top as vectors: for each, a conditional prior p(z_i | z_<i) from
    the latents above it and a posterior q(z_i | x, z_<i) from those and the encoder's flat
    features (through `bottom_up`, shared by the levels); the decoder reads every level's
    latents side by side. Inference (`walk` with features) and generation (without) share
    it; `SpatialTopDown` (`spatial.py`) is the same walk for latent maps."""

    def __init__(self, top: int, features: int, sizes: Sequence[int], width: int) -> None:
        super().__init__()
        self.sizes = list(sizes)
        # none without levels: then the model is the one-level CVAE, state dict and all
        self.bottom_up = (
            nn.Sequential(nn.Linear(features, width), nn.ReLU()) if self.sizes else None
        )
        self.priors, self.posteriors = nn.ModuleList(), nn.ModuleList()
        above = top
        for size in self.sizes:
            self.priors.append(_gaussian_head(above, width, size))
            self.posteriors.append(_gaussian_head(width + above, width, size))
            above += size

    def walk(
        self,
        decoder: Decoder,
        condition: Callable[[torch.Tensor], torch.Tensor],
        features: Features | None,
        top: torch.Tensor,
        choose: Choose,
        decode: bool = True,
        logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, list[Gaussian | None], list[Gaussian]]:
        """Walk the levels: each one's conditional prior from the latents above it, its
        posterior from those and the encoder's `features` (None when generating: no
        posterior), its latents `choose(level, posterior, prior)` (level 1 is the first
        below the top); then the decoder's logits of every level's latents (`condition`
        adds a class code; `logits_of`: another computation of `decoder.logits`; None
        without `decode`). Returns them, the latents side by side with `top`, the
        posteriors and the priors; leading dimensions of `top` (samples, batch) carry
        through."""
        bottom_up = None if features is None or not self.sizes else self.bottom_up(features[0])
        above, posteriors, priors = top, [], []
        for index, (prior_head, posterior_head) in enumerate(
            zip(self.priors, self.posteriors, strict=True)
        ):
            prior = _gaussian(prior_head, above)
            posterior = None
            if bottom_up is not None:
                reading = torch.cat([bottom_up.expand(*above.shape[:-1], -1), above], dim=-1)
                posterior = _gaussian(posterior_head, reading)
            above = torch.cat([above, choose(index + 1, posterior, prior)], dim=-1)
            posteriors.append(posterior)
            priors.append(prior)
        logits = None
        if decode:
            inputs = condition(above.flatten(0, -2))
            logits = (logits_of or decoder.logits)(inputs).unflatten(0, above.shape[:-1])
        return logits, above, posteriors, priors


def at_prior_means(level: int, posterior: Gaussian | None, prior: Gaussian) -> torch.Tensor:
    """A `choose` of `walk`: each level at its conditional prior's mean."""
    return prior.mu


def drawing(sizes: Sequence[int], eps: torch.Tensor) -> Choose:
    """A `choose` of `walk`: level i is its conditional prior's mean plus its standard
    deviation times `eps`'s columns for that level (`(B, sum(sizes))` standard normal noise,
    scaled by a temperature)."""
    ends = list(itertools.accumulate(sizes, initial=0))

    def draw(index: int, posterior: Gaussian | None, prior: Gaussian) -> torch.Tensor:
        noise = eps[..., ends[index - 1] : ends[index]]
        return prior.mu + torch.exp(0.5 * prior.log_var) * noise

    return draw


class Sampling(nn.Module):
    """Images of top-level latents `z` and the lower levels' noise `eps` (and a conditional
    model's `labels`): `HVAE.decode_noise` as a module of its own, what export writes."""

    def __init__(
        self,
        top_down: TopDown | SpatialTopDown,
        decoder: Decoder,
        conditioning: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.top_down, self.decoder, self.conditioning = top_down, decoder, conditioning

    def logits(
        self, z: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        def condition(latents: torch.Tensor) -> torch.Tensor:
            if labels is None:
                return latents
            return self.conditioning.decoder_input(latents, self.conditioning.code(labels))

        draw = drawing(self.top_down.sizes, eps)
        return self.top_down.walk(self.decoder, condition, None, z, draw)[0]

    def forward(
        self, z: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.decoder.images(self.logits(z, eps, labels))


class HVAE(CVAE):
    """A top latent of `latent_dim` and the levels `levels` below it (top-down): sizes of
    vector levels (`TopDown`, networks of width `level_width`), or `[channels, height,
    width]` of latent maps on the decoder's resolutions (`SpatialTopDown`).

    Every other setting is `CVAE`'s. The training objective is the ELBO (or IWAE with
    `iw_samples` > 1) over all levels: -log p(x | z) + beta * (KL of the top to `prior` +
    sum of each lower level's KL to its conditional prior, in closed form given the latents
    drawn above it); `free_bits` floors each dimension of every level. Logged beside `kl`:
    `kl_level_<i>`, level 0 the top (under IWAE the mean over the samples of each level's
    log q - log p, which add up to `kl`). `level_warmup_steps` (one per level, top first; None:
    off) ramps each level's KL weight from 0 to `beta` over its own number of training steps,
    on top of `beta_schedule` (the ELBO only: not with `iw_samples` > 1)."""

    def __init__(
        self,
        *args: object,
        levels: Sequence[int] | Sequence[Sequence[int]] = (),
        level_width: int = 256,
        level_warmup_steps: Sequence[int] | None = None,
        **kwargs: object,
    ) -> None:
        levels = check_levels(levels, level_width)
        # read by `_decoder_latents` while `CVAE` builds the decoder
        self.maps = bool(levels) and isinstance(levels[0], list)
        self.level_sizes = [math.prod(level) if self.maps else level for level in levels]
        check_level_warmup(level_warmup_steps, len(levels), kwargs.get("iw_samples", 1))
        super().__init__(*args, **kwargs)  # saves `levels` as checked: plain lists
        hp = self.hparams
        if self.maps:
            shapes = check_spatial_levels(levels, hp.image_size, hp.hidden_channels)
            self.top_down = SpatialTopDown(shapes, decoder_sides(hp.image_size, hp.hidden_channels))
        else:
            features = self.encoder.mu.in_features
            self.top_down = TopDown(hp.latent_dim, features, self.level_sizes, level_width)

    # --- the structure ---------------------------------------------------------------------
    def _decoder_latents(self, latent_dim: int) -> int:
        """Vector levels: the decoder reads them all; maps join it on the way."""
        return latent_dim if self.maps else latent_dim + sum(self.level_sizes)

    @property
    def latent_levels(self) -> int:
        return 1 + len(self.level_sizes)

    def _features(self, x: torch.Tensor, labels: torch.Tensor | None) -> Features:
        """The encoder's flat features of images `x` (what the top posterior's heads and
        every vector level's posterior read) and its feature maps (what maps' read)."""
        return bottom_up(self.encoder.features, self.encoder_input(x, labels))

    def _top(self, features: Features) -> Gaussian:
        return Gaussian(self.encoder.mu(features[0]), self.encoder.log_var(features[0]))

    def _walk(
        self,
        features: Features | None,
        top: torch.Tensor,
        choose: Choose,
        labels: torch.Tensor | None,
        decode: bool = True,
        logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, list[Gaussian | None], list[Gaussian]]:
        """`top_down.walk` from top-level latents `top` (leading dimensions: samples,
        batch) of images of class `labels` (indices, one per image, or None)."""
        rows = math.prod(top.shape[:-1])
        repeated = None if labels is None else labels.repeat(rows // len(labels))

        def condition(latents: torch.Tensor) -> torch.Tensor:
            return self._decoder_input(latents, repeated)

        return self.top_down.walk(self.decoder, condition, features, top, choose, decode, logits_of)

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Posterior:
        """Every level's posterior of images `x`, along the path of the upper levels'
        posterior means, with each lower level's conditional prior beside it."""
        labels = self.class_indices(labels, len(x))
        features = self._features(x, labels)
        top = self._top(features)
        choose = lambda i, q, p: q.mu  # noqa: E731
        _, _, posteriors, priors = self._walk(features, top.mu, choose, labels, decode=False)
        return Posterior((top, *posteriors), (None, *priors))

    def _encode_top(self, x: torch.Tensor, labels: torch.Tensor | None) -> Gaussian:
        return self._top(self._features(x, labels))

    def _encoding(self, x: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        features = self._features(x, labels)
        return features, self._top(features)

    def kl_per_dimension(self, posterior: Posterior) -> tuple[torch.Tensor, ...]:
        top = self.prior.kl_per_dimension(posterior.mu, posterior.log_var)
        lower = (
            kl_per_dimension(q.mu, q.log_var, p.mu, p.log_var)
            for q, p in zip(posterior.levels[1:], posterior.priors[1:], strict=True)
        )
        return (top, *lower)

    # --- decoding --------------------------------------------------------------------------
    def level_noise(
        self, n: int, generator: torch.Generator | None, temperatures: Sequence[float]
    ) -> torch.Tensor:
        """`(n, sum(levels))` standard normal noise for the levels below the top, each
        level's columns scaled by its temperature, drawn with a CPU `generator`."""
        scale = torch.cat(
            [
                torch.full((size,), float(t))
                for size, t in zip(self.level_sizes, temperatures, strict=True)
            ]
        )
        return (torch.randn(n, sum(self.level_sizes), generator=generator) * scale).to(self.device)

    def decode_noise(
        self, z: torch.Tensor, eps: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images of top-level latents `z` and the lower levels' noise `eps` (`drawing`):
        the sampling graph `cvae.export` writes (`Sampling`)."""
        labels = self.class_indices(labels, len(z))
        return Sampling(self.top_down, self.decoder, self.conditioning)(z, eps, labels)

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's logits of top-level latents `z`, the levels below at their
        conditional priors' means."""
        return self._walk(None, z, at_prior_means, self.class_indices(labels, len(z)))[0]

    def _logits_of_all(self, latents: torch.Tensor, labels: object) -> torch.Tensor:
        """The decoder's logits of every level's latents side by side (`Posterior.means`)."""
        labels = self.class_indices(labels, len(latents))
        ends = list(itertools.accumulate(self.level_sizes, initial=self.hparams.latent_dim))
        given = lambda i, q, p: latents[..., ends[i - 1] : ends[i]]  # noqa: E731
        return self._walk(None, latents[..., : ends[0]], given, labels)[0]

    def decode_drawn(
        self,
        z: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator | None,
        temperatures: Sequence[float],
    ) -> torch.Tensor:
        if not self.level_sizes:  # the one-level model's draws
            return super().decode_drawn(z, labels, generator, temperatures)
        return self.decode_noise(z, self.level_noise(len(z), generator, temperatures), labels)

    def exportable(self) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], list, list]]:
        """`encoder` as the one-level model's (images -> the top level's `mu`, `log_var`) and
        `decoder` as the sampling graph: top-level latents `z` and the lower levels' noise
        `eps` (`decode_noise`; zeros: each level at its prior's mean) -> images."""
        parts = super().exportable()
        z = torch.randn(2, self.hparams.latent_dim, device=self.device)
        eps = torch.randn(2, sum(self.level_sizes), device=self.device)
        sampling = Sampling(self.top_down, self.decoder, self.conditioning).eval()
        if self.conditional:
            labels = parts["decoder"][1][1]
            parts["decoder"] = (sampling, (z, eps, labels), ["z", "eps", "labels"], ["images"])
        else:
            parts["decoder"] = (sampling, (z, eps), ["z", "eps"], ["images"])
        return parts

    def fast_logits(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Latent maps join the decoder's layers: no `FastDecoder` of its input."""
        return None if self.maps else super().fast_logits()

    # --- bounds ----------------------------------------------------------------------------
    def _one_sample_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        encoding: tuple,
        beta: float,
        free_bits: float,
    ) -> dict[str, torch.Tensor]:
        features, top = encoding
        z = reparameterize(top.mu, top.log_var)
        sampled = lambda i, q, p: reparameterize(q.mu, q.log_var)  # noqa: E731
        logits, _, posteriors, priors = self._walk(features, z, sampled, labels)
        recon = -self.likelihood(logits, x).mean()
        mu, log_var = top.mu.float(), top.log_var.float()
        kls = [self.prior.kl(mu, log_var, z).mean()]
        floored = [self.prior.free_bits_kl(mu, log_var, free_bits) if free_bits > 0 else kls[0]]
        for q, p in zip(posteriors, priors, strict=True):
            q, p = q.map(torch.Tensor.float), p.map(torch.Tensor.float)
            kls.append(kl_divergence(q.mu, q.log_var, p.mu, p.log_var).mean())
            floored.append(
                free_bits_kl(q.mu, q.log_var, free_bits, p.mu, p.log_var)
                if free_bits > 0
                else kls[-1]
            )
        kl = torch.stack(kls).sum()
        weighted = torch.stack(floored) * self._level_weights().to(recon)
        terms = {"loss": recon + beta * weighted.sum(), "recon": recon, "kl": kl}
        return terms | self._kl_per_level(torch.stack(kls))

    def _kl_per_level(self, kls: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"kl_level_{i}": value for i, value in enumerate(kls)}

    def _level_weights(self) -> torch.Tensor:
        """Each level's KL weight at this training step under `level_warmup_steps` (ones
        when it is off, and outside training: validation scores the final objective)."""
        steps = self.hparams.get("level_warmup_steps")
        if steps is None or not self.training:
            return torch.ones(self.latent_levels)
        return torch.tensor([min(1.0, self.global_step / n) if n > 0 else 1.0 for n in steps])

    def _closed_form_kl(self, encoding: tuple) -> None:
        return None  # the lower levels' KL depends on the latents drawn above them

    def _log_weight_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        encoding: tuple,
        n: int,
        generator: torch.Generator | None = None,
        logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x | z) `(n, B)` and each level's log p(z_i | z_<i) - log q(z_i | x, z_<i)
        `(levels, n, B)`, for `n` samples of every level per image."""
        features, top = encoding
        z = reparameterize(top.mu, top.log_var, generator, samples=n)  # (n, B, latent)
        log_ratios = [
            self.prior.log_prob(z.float())
            - normal_log_density(z.float(), top.mu.float(), top.log_var.float())
        ]

        def draw(index: int, posterior: Gaussian, prior: Gaussian) -> torch.Tensor:
            eps = torch.randn(posterior.mu.shape, generator=generator).to(posterior.mu)
            sample = posterior.mu + torch.exp(0.5 * posterior.log_var) * eps
            q, p, s = (
                posterior.map(torch.Tensor.float),
                prior.map(torch.Tensor.float),
                sample.float(),
            )
            log_ratios.append(
                normal_log_density(s, p.mu, p.log_var) - normal_log_density(s, q.mu, q.log_var)
            )
            return sample

        logits = self._walk(features, z, draw, labels, logits_of=logits_of)[0]
        return self.likelihood(logits, x), torch.stack(log_ratios)

    def elbo_terms(
        self,
        x: torch.Tensor,
        labels: object = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Posterior]:
        """`(log p(x | z), KL of each level (levels, B), posterior)` of each image, one
        sample of every level (each lower level's KL in closed form given the latents drawn
        above it); the posterior is the one along the sampled path."""
        labels = self.class_indices(labels, len(x))
        x = unit_range(x.to(self.device))
        features, top = self._encoding(x, labels)
        z = reparameterize(top.mu, top.log_var, generator)

        def draw(index: int, posterior: Gaussian, prior: Gaussian) -> torch.Tensor:
            return reparameterize(posterior.mu, posterior.log_var, generator)

        logits, _, posteriors, priors = self._walk(features, z, draw, labels)
        kls = [self.prior.kl(top.mu, top.log_var, z)]
        kls += [
            kl_divergence(q.mu, q.log_var, p.mu, p.log_var)
            for q, p in zip(posteriors, priors, strict=True)
        ]
        posterior = Posterior((top, *posteriors), (None, *priors))
        return self.likelihood(logits, x), torch.stack(kls), posterior
