"""The terms of the negative ELBO, per image: reconstruction and KL to the standard normal,
plus the proper log-densities that likelihood estimates need."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RECON_LOSSES = ("mse", "bce")


def check_recon_loss(kind: str) -> None:
    if kind not in RECON_LOSSES:
        raise ValueError(f"model.recon_loss={kind!r} is not one of {', '.join(RECON_LOSSES)}")


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) in closed form, summed over latent dims: shape (B,)."""
    return -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=1)


def reconstruction_loss(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """Per-image reconstruction error summed over pixels: shape (B,).

    `mse` is the squared error: the negative log-likelihood of a Gaussian decoder with fixed
    variance 1/2, up to a constant. `bce` is the binary cross-entropy: that of a Bernoulli
    decoder, exact for binary images and a common choice for near-binary ones. Computed in
    float32 whatever the autocast precision, since both sum many small terms.
    """
    with torch.autocast(x.device.type, enabled=False):
        return _per_pixel(x_hat.float(), x.float(), kind).flatten(1).sum(dim=1)


def _per_pixel(x_hat: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
    check_recon_loss(kind)
    if kind == "mse":
        return F.mse_loss(x_hat, x, reduction="none")
    return F.binary_cross_entropy(x_hat, x, reduction="none")


def log_likelihood(x_hat: torch.Tensor, x: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """log p(x | z) of each image as a proper density (or mass), in nats: shape (B,).

    `bce`: Bernoulli with means `x_hat`, a probability for binary `x` (for other `x` it is
    not a normalised likelihood). `mse`: Gaussian N(x_hat, 1/2) per pixel, a density over
    real pixel values, so `mse` = -log p(x | z) - D/2 log(pi) for D values per image.
    """
    nll = reconstruction_loss(x_hat, x, kind)
    if kind == "mse":
        nll = nll + 0.5 * x[0].numel() * math.log(math.pi)
    return -nll


def normal_log_density(
    z: torch.Tensor, mu: torch.Tensor | None = None, log_var: torch.Tensor | None = None
) -> torch.Tensor:
    """log N(z; mu, exp(log_var)) summed over the last dimension (standard normal by default)."""
    mu = torch.zeros_like(z) if mu is None else mu
    log_var = torch.zeros_like(z) if log_var is None else log_var
    return -0.5 * ((z - mu).pow(2) / log_var.exp() + log_var + math.log(2 * math.pi)).sum(-1)
