"""The latent side of the ELBO: KL to the standard normal, Gaussian log-densities, and the
two classic counter-measures to posterior collapse, KL warm-up and free bits.

The reconstruction term is the decoder's likelihood: see `likelihoods.py`.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("constant", "linear", "cyclical")


def kl_per_dimension(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, 1)) of each latent dimension: shape (B, latent)."""
    return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp())


def kl_divergence(mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(0, I)) in closed form, summed over latent dims: shape (B,)."""
    return kl_per_dimension(mu, log_var).sum(dim=1)


def free_bits_kl(mu: torch.Tensor, log_var: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The batch-mean KL with each dimension's share floored at `free_bits` nats (Kingma et
    al., 2016): dimensions below the floor get no pressure towards the prior."""
    per_dim = kl_per_dimension(mu, log_var).mean(dim=0)
    return per_dim.clamp_min(free_bits).sum()


def beta_at(step: int, beta: float, schedule: str = "constant", warmup_steps: int = 0) -> float:
    """The KL weight at a training step. `linear` ramps from 0 to `beta` over `warmup_steps`
    (Bowman et al., 2016); `cyclical` repeats cycles of 2 * `warmup_steps` steps, a ramp then
    a plateau at `beta` (Fu et al., 2019); `constant` is `beta` throughout."""
    if schedule == "constant" or warmup_steps <= 0:
        return beta
    position = step if schedule == "linear" else step % (2 * warmup_steps)
    return beta * min(1.0, position / warmup_steps)


def normal_log_density(
    z: torch.Tensor, mu: torch.Tensor | None = None, log_var: torch.Tensor | None = None
) -> torch.Tensor:
    """log N(z; mu, exp(log_var)) summed over the last dimension (standard normal by default)."""
    mu = torch.zeros_like(z) if mu is None else mu
    log_var = torch.zeros_like(z) if log_var is None else log_var
    return -0.5 * ((z - mu).pow(2) / log_var.exp() + log_var + math.log(2 * math.pi)).sum(-1)
