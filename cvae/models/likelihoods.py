"""The decoder's likelihood p(x | z): a proper density (or mass) per image, so that the
reconstruction term is a negative log-likelihood and NLL and bits/dim mean something.

A likelihood also says how many channels the decoder outputs for it (`output_channels`:
one parameter per pixel value for the Gaussians and the Bernoulli, a mixture's parameters
for `logistic_mixture`), how they become the image shown (`image_head`: a parameter-free
module, the decoder's last layer) and how to draw pixels from them (`sample`).

The textbook "MSE" fixes a Gaussian's variance at an arbitrary value, which is what blurs
VAE samples; a learned or calibrated variance lets the data set it (Rybkin, Daniilidis and
Levine, "Simple and Effective VAE Training with Calibrated Decoders", ICML 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LIKELIHOODS = (
    "bernoulli",
    "gaussian_fixed",
    "gaussian_learned",
    "gaussian_optimal",
    "logistic_mixture",
)
ALIASES = {"bce": "bernoulli", "mse": "gaussian_fixed"}  # the seed's names
RECON_LOSSES = (*LIKELIHOODS, *ALIASES)
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)
IMAGE_DIMS = (-3, -2, -1)  # channels, height, width: what one image's likelihood sums


def check_recon_loss(kind: str) -> str:
    """The canonical likelihood name of `kind`, or a one-line error naming the key."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"model.recon_loss={kind!r} is not one of {', '.join(RECON_LOSSES)}")
    return ALIASES.get(kind, kind)


def check_mixture_components(components: object) -> int:
    """`model.mixture_components` as a positive integer, or a one-line error naming it."""
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"model.mixture_components must be a positive integer, got {components!r}")
    return components


def gaussian_log_density(
    x_hat: torch.Tensor, x: torch.Tensor, log_sigma: torch.Tensor
) -> torch.Tensor:
    """log N(x; x_hat, sigma^2) summed over each image's values `(C, H, W)`: shape
    `x_hat.shape[:-3]`. One `log_sigma` for all values, so only the squared error is per
    value (two passes over the pixels); `x` broadcasts against `x_hat` (importance samples)."""
    squared_error = (x - x_hat).pow(2).sum(dim=IMAGE_DIMS)
    values = x.shape[-3:].numel()
    return -0.5 * torch.exp(-2 * log_sigma) * squared_error - values * (log_sigma + HALF_LOG_TWO_PI)


class Likelihood(nn.Module):
    """log p(x | z) per image, in nats, from the decoder's logits (its output before the
    Sigmoid), computed in float32 whatever the autocast precision (it sums thousands of
    small terms). `x` may lack leading dimensions of `logits` (several samples per image):
    it is broadcast, never copied."""

    continuous = True  # a density over real pixel values (else a mass over discrete ones)

    def bits_per_dim(
        self, nll: torch.Tensor | float, dims: int, binary_data: bool
    ) -> torch.Tensor | float | None:
        """`nll` (nats per image of `dims` values) in bits per value of the 8-bit data: the
        one definition training and `cvae.evaluate` share. A density on [0, 1] bounds the
        8-bit values' probability once log 256 per value is added (so +8 bits; exact when
        `nll` was scored on dequantised pixels). The discrete likelihoods override it."""
        return (nll + dims * math.log(256)) / (dims * math.log(2))

    def output_channels(self, channels: int) -> int:
        """How many channels the decoder outputs for images of `channels` channels."""
        return channels

    def image_head(self, channels: int) -> nn.Module:
        """The decoder's last layer, parameter-free: its output (the parameters this
        likelihood scores) to the image shown, in [0, 1]. Here the pixel means."""
        return nn.Sigmoid()

    def sample(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Pixels drawn from p(x | z), in [0, 1]; by default the means (noise-free)."""
        return torch.sigmoid(logits)

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.log_prob(logits.float(), x.float())

    def log_prob(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Pixels ~ Bernoulli(sigmoid(logits)): a probability of binary images (the seed's `bce`).

    Computed from the logits, exact for confident outputs: binary cross entropy on Sigmoid
    outputs clamps at 100 nats per pixel and loses precision as the Sigmoid saturates."""

    continuous = False

    def bits_per_dim(
        self, nll: torch.Tensor | float, dims: int, binary_data: bool
    ) -> torch.Tensor | float | None:
        """Exact for binary data; None for other images, where its NLL means nothing."""
        return nll / (dims * math.log(2)) if binary_data else None

    def log_prob(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.expand_as(logits)
        bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
        return -bce.sum(dim=IMAGE_DIMS)


class Gaussian(Likelihood):
    """Pixels ~ N(sigmoid(logits), sigma^2): the means are the decoder's pixel intensities."""

    def log_prob(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x_hat = torch.sigmoid(logits)
        return gaussian_log_density(x_hat, x, self.current_log_sigma(x_hat, x))

    def current_log_sigma(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class GaussianFixed(Gaussian):
    """Sigma from config. With sigma^2 = 1/2 the negative log-likelihood is the seed's summed
    squared error plus a constant (`mse`)."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma

    def current_log_sigma(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor(math.log(self.sigma))


class GaussianLearned(Gaussian):
    """One log-sigma learned with the networks."""

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma)))

    def current_log_sigma(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.log_sigma


class GaussianOptimal(Gaussian):
    """Sigma set, in training, to its maximum-likelihood value for the batch, the root mean
    squared error (clamped below at `min_sigma`), as in Rybkin et al.'s sigma-VAE.
    Evaluation uses a running average of those values, so each image's likelihood does not
    depend on the rest of its batch."""

    def __init__(self, min_sigma: float, momentum: float = 0.05) -> None:
        super().__init__()
        self.min_log_sigma, self.momentum = math.log(min_sigma), momentum
        self.register_buffer("log_sigma", torch.tensor(0.0))
        self.register_buffer("updates", torch.tensor(0))

    def optimal_log_sigma(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * (x - x_hat).pow(2).mean().log()).clamp_min(self.min_log_sigma)

    def current_log_sigma(self, x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.log_sigma
        log_sigma = self.optimal_log_sigma(x_hat, x)
        if torch.isfinite(log_sigma):  # a diverged batch (then skipped) must not stick
            with torch.no_grad():
                weight = 1.0 if self.updates == 0 else self.momentum
                self.log_sigma.lerp_(log_sigma.detach(), weight)
                self.updates += 1
        return log_sigma


LEVELS = 255  # 8-bit pixels: values k / 255, k = 0..255
MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor: a logistic narrower than this is one level anyway
MAX_LOG_SCALE = 7.0  # wider than the pixel range 150 times over: keeps each bin's mass > 0


class LogisticMixture(Likelihood):
    """Discretized mixture of logistics (Salimans et al. 2017, "PixelCNN++"), the likelihood
    of published bits/dim tables (NVAE, VDVAE): each pixel's 8-bit values get an exact
    probability, the logistic's mass over the value's bin, the edge bins (0 and 255) taking
    the tails. `components` logistics per pixel share one choice of component across the
    channels; channel c's location is shifted by learned multiples of the channels before it
    (PixelCNN++'s coupling: green reads red, blue reads red and green).

    The decoder outputs, per pixel, `components` mixture logits, then per component and
    channel a location (on PixelCNN++'s [-1, 1] scale), a log-scale, and the coupling
    coefficients (tanh of them): `components * (1 + 2C + C(C - 1) / 2)` channels, 10 per
    component for RGB, 3 for grey. Pixels are scored at their nearest 8-bit value.
    """

    continuous = False

    def __init__(self, components: int) -> None:
        super().__init__()
        self.components = components

    def bits_per_dim(
        self, nll: torch.Tensor | float, dims: int, binary_data: bool
    ) -> torch.Tensor | float | None:
        """Exact: `nll` is -log p of the 8-bit values, with no dequantisation offset."""
        return nll / (dims * math.log(2))

    def output_channels(self, channels: int) -> int:
        return self.components * (1 + 2 * channels + channels * (channels - 1) // 2)

    def image_head(self, channels: int) -> nn.Module:
        return MixtureMean(self.components, channels)

    def log_prob(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[-3]
        weights, loc, log_scale, coupling = split_mixture(logits, self.components, channels)
        level = (x * LEVELS).round().clamp(0, LEVELS)  # (..., C, H, W) integers
        value = (level / LEVELS * 2 - 1).unsqueeze(-4)  # (..., 1, C, H, W) on [-1, 1]
        loc = coupled(loc, coupling, value)
        log_mass = discretized_logistic_log_mass(value, level.unsqueeze(-4), loc, log_scale)
        per_pixel = torch.logsumexp(F.log_softmax(weights, dim=-3) + log_mass.sum(-3), dim=-3)
        return per_pixel.sum(dim=(-2, -1))

    def sample(
        self, logits: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A component per pixel, then each channel's logistic in turn (later channels read
        the values drawn before them), rounded to the nearest 8-bit value."""
        channels = _channels(logits.shape[-3], self.components)
        weights, loc, log_scale, coupling = split_mixture(logits, self.components, channels)
        gumbel = -torch.log(-torch.log(_uniform(weights, generator)))
        chosen = F.one_hot((weights + gumbel).argmax(dim=-3), self.components)
        chosen = chosen.movedim(-1, -3).unsqueeze(-3).to(loc.dtype)  # (..., K, 1, H, W)
        loc, log_scale = (loc * chosen).sum(-4), (log_scale * chosen).sum(-4)
        coupling = (coupling * chosen).sum(-4)
        u = _uniform(loc, generator)
        noise = torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
        values: list[torch.Tensor] = []
        for c in range(channels):
            shift = sum(
                (coupling[..., _pair(c, j), :, :] * values[j] for j in range(c)),
                torch.zeros_like(loc[..., c, :, :]),
            )
            values.append((loc[..., c, :, :] + shift + noise[..., c, :, :]).clamp(-1, 1))
        image = (torch.stack(values, dim=-3) + 1) / 2
        return (image * LEVELS).round() / LEVELS


class MixtureMean(nn.Module):
    """A logistic mixture's mean image, in [0, 1]: each component's channel means (coupled
    through the channels' means), weighted by the mixture weights. The logistics' means,
    without the edge bins' clipping: what `decode` shows (the mode of a mixture can jump
    between components from one pixel to the next)."""

    def __init__(self, components: int, channels: int) -> None:
        super().__init__()
        self.components, self.channels = components, channels

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        weights, loc, _, coupling = split_mixture(logits, self.components, self.channels)
        means: list[torch.Tensor] = []
        for c in range(self.channels):
            mean = loc[..., c, :, :]
            for j in range(c):
                mean = mean + coupling[..., _pair(c, j), :, :] * means[j]
            means.append(mean)
        per_component = torch.stack(means, dim=-3)  # (..., K, C, H, W)
        mean = (F.softmax(weights, dim=-3).unsqueeze(-3) * per_component).sum(-4)
        return ((mean + 1) / 2).clamp(0, 1)


def split_mixture(
    logits: torch.Tensor, components: int, channels: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's output `(..., K (1 + 2C + C(C-1)/2), H, W)` as mixture logits
    `(..., K, H, W)`, locations and log-scales `(..., K, C, H, W)` and coupling coefficients
    in (-1, 1) `(..., K, C(C-1)/2, H, W)`."""
    k, pairs = components, channels * (channels - 1) // 2
    weights, loc, log_scale, coupling = logits.split(
        [k, k * channels, k * channels, k * pairs], dim=-3
    )
    per_component = (*logits.shape[:-3], k, -1, *logits.shape[-2:])
    return (
        weights,
        loc.reshape(per_component),
        log_scale.reshape(per_component).clamp(MIN_LOG_SCALE, MAX_LOG_SCALE),
        torch.tanh(coupling.reshape(per_component)),
    )


def coupled(loc: torch.Tensor, coupling: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Each channel's location shifted by the coupling coefficients times the values of the
    channels before it (the observed values when scoring; broadcast against `loc`)."""
    columns = []
    for c in range(loc.shape[-3]):
        column = loc[..., c, :, :]
        for j in range(c):
            column = column + coupling[..., _pair(c, j), :, :] * value[..., j, :, :]
        columns.append(column)
    return torch.stack(torch.broadcast_tensors(*columns), dim=-3)


def discretized_logistic_log_mass(
    value: torch.Tensor, level: torch.Tensor, loc: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(8-bit `level`) under a logistic of `loc` and `log_scale` on [-1, 1]: the log of
    sigmoid(a) - sigmoid(b), a and b the bin's edges standardised, computed as
    log sigmoid(a) + log sigmoid(-b) + log(1 - exp(b - a)), finite for any logits (no
    fallback to the density as PixelCNN++'s code needs); level 0 takes the mass below its
    upper edge, level 255 the mass above its lower edge."""
    inverse_scale = torch.exp(-log_scale)
    centred = value - loc
    upper = inverse_scale * (centred + 1 / LEVELS)
    lower = inverse_scale * (centred - 1 / LEVELS)
    log_below_upper = F.logsigmoid(upper)
    log_above_lower = F.logsigmoid(-lower)
    width = 2 / LEVELS * inverse_scale  # upper - lower > 0
    log_bin = log_below_upper + log_above_lower + torch.log(-torch.expm1(-width))
    return torch.where(
        level == 0, log_below_upper, torch.where(level == LEVELS, log_above_lower, log_bin)
    )


def _pair(c: int, j: int) -> int:
    """Index of the coefficient coupling channel c to an earlier channel j (j < c)."""
    return c * (c - 1) // 2 + j


def _channels(output_channels: int, components: int) -> int:
    """The image channels C of a decoder output of `output_channels` = K (1 + 2C + C(C-1)/2)."""
    per_component = output_channels // components
    return next(
        c for c in range(1, per_component + 1) if 1 + 2 * c + c * (c - 1) // 2 == per_component
    )


def _uniform(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(eps, 1 - eps) noise shaped like `like` (on its device): no log of 0."""
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype)
    return u.to(like.device).clamp(1e-5, 1 - 1e-5)


def build_likelihood(
    kind: str, sigma: float = 2**-0.5, min_sigma: float = 0.0025, components: int = 10
) -> Likelihood:
    """The likelihood named by `model.recon_loss`."""
    kind = check_recon_loss(kind)
    if kind == "logistic_mixture":
        return LogisticMixture(check_mixture_components(components))
    if kind == "bernoulli":
        return Bernoulli()
    if kind == "gaussian_fixed":
        return GaussianFixed(sigma)
    if kind == "gaussian_learned":
        return GaussianLearned(sigma)
    return GaussianOptimal(min_sigma)
