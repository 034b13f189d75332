"""The decoder's likelihood p(x | z): a proper density (or mass) per image, so that the
reconstruction term is a negative log-likelihood and NLL and bits/dim mean something.

The textbook "MSE" fixes a Gaussian's variance at an arbitrary value, which is what blurs
VAE samples; a learned or calibrated variance lets the data set it (Rybkin, Daniilidis and
Levine, "Simple and Effective VAE Training with Calibrated Decoders", ICML 2021).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LIKELIHOODS = ("bernoulli", "gaussian_fixed", "gaussian_learned", "gaussian_optimal")
ALIASES = {"bce": "bernoulli", "mse": "gaussian_fixed"}  # the seed's names
RECON_LOSSES = (*LIKELIHOODS, *ALIASES)
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)
IMAGE_DIMS = (-3, -2, -1)  # channels, height, width: what one image's likelihood sums


def check_recon_loss(kind: str) -> str:
    """The canonical likelihood name of `kind`, or a one-line error naming the key."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"model.recon_loss={kind!r} is not one of {', '.join(RECON_LOSSES)}")
    return ALIASES.get(kind, kind)


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

    continuous = True  # a density over real pixel values (else a mass over binary ones)

    def bits_per_dim(
        self, nll: torch.Tensor | float, dims: int, binary_data: bool
    ) -> torch.Tensor | float | None:
        """`nll` (nats per image of `dims` values) in bits per value of the 8-bit data: the
        one definition training and `cvae.evaluate` share. A density on [0, 1] bounds the
        8-bit values' probability once log 256 per value is added (so +8 bits; exact when
        `nll` was scored on dequantised pixels); a Bernoulli is a probability of binary
        data only: None for other images, where its NLL means nothing."""
        if self.continuous:
            return (nll + dims * math.log(256)) / (dims * math.log(2))
        return nll / (dims * math.log(2)) if binary_data else None

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


def build_likelihood(kind: str, sigma: float = 2**-0.5, min_sigma: float = 0.0025) -> Likelihood:
    """The likelihood named by `model.recon_loss`."""
    kind = check_recon_loss(kind)
    if kind == "bernoulli":
        return Bernoulli()
    if kind == "gaussian_fixed":
        return GaussianFixed(sigma)
    if kind == "gaussian_learned":
        return GaussianLearned(sigma)
    return GaussianOptimal(min_sigma)
