"""The latent side of the ELBO: the closed-form KL between diagonal Gaussians (to N(0, I) by
default), Gaussian log-densities, and the two classic counter-measures to posterior
collapse, KL warm-up and free bits. Which prior the KL is to: `priors.py`.

The reconstruction term is the decoder's likelihood: see `likelihoods.py`.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("constant", "linear", "cyclical")


def kl_per_dimension(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    prior_mean: torch.Tensor | None = None,
    prior_log_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(prior_mean, exp(prior_log_var))) of each latent dimension:
    shape (B, latent). Without a prior mean and log-variance: to N(0, 1)."""
    if prior_mean is None and prior_log_var is None:
        return -0.5 * (1 + log_var - mu.pow(2) - log_var.exp())
    prior_mean = torch.zeros_like(mu) if prior_mean is None else prior_mean
    prior_log_var = torch.zeros_like(log_var) if prior_log_var is None else prior_log_var
    ratio = (log_var.exp() + (mu - prior_mean).pow(2)) * torch.exp(-prior_log_var)
    return 0.5 * (prior_log_var - log_var + ratio - 1)


def kl_divergence(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    prior_mean: torch.Tensor | None = None,
    prior_log_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(N(mu, exp(log_var)) || N(prior_mean, exp(prior_log_var))) in closed form, summed
    over latent dims: shape (B,). The prior defaults to N(0, I)."""
    return kl_per_dimension(mu, log_var, prior_mean, prior_log_var).sum(dim=1)


def free_bits_kl(
    mu: torch.Tensor,
    log_var: torch.Tensor,
    free_bits: float,
    prior_mean: torch.Tensor | None = None,
    prior_log_var: torch.Tensor | None = None,
) -> torch.Tensor:
    """The batch-mean KL with each dimension's share floored at `free_bits` nats (Kingma et
    al., 2016): dimensions below the floor get no pressure towards the prior (a diagonal
    Gaussian, N(0, I) by default: free bits need a prior that factorises)."""
    per_dim = kl_per_dimension(mu, log_var, prior_mean, prior_log_var).mean(dim=0)
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
