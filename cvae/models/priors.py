"""The prior p(z): one seam for every place that needs its density, its samples or the KL to it.

`model.prior` (config group `model/prior`) picks one:
- `standard`: N(0, I), the classic VAE's (the default; every checkpoint from before priors
  loads as this: it has no parameters, so the state dict is unchanged);
- `mog`: a learnable mixture of `prior_components` diagonal Gaussians (means, variances and
  weights trained with the model);
- `vamp`: the VampPrior (Tomczak and Welling, 2018), the uniform mixture of the encoder's
  posteriors of `prior_components` learnable pseudo-inputs, pushed through the encoder at
  every use, so the prior follows the encoder as it trains.

A prior that is one diagonal Gaussian (`standard`; `mog` or `vamp` with one component)
factorises over the latent dimensions: its KL has a closed form (`losses.kl_divergence`) and
a per-dimension split (free bits, `kl_per_dimension`). A mixture of several does not: its KL
is estimated from the posterior sample, log q(z | x) - log p(z) (unbiased, one sample), and
free bits are refused.

Conditional models: every prior here is p(z), the same for every class; the class enters the
encoder and the decoder only (`conditioning.py`), so a sample of class y is a z from the
prior decoded with y's code. A conditional VampPrior's pseudo-inputs each carry a class
(`pseudo_labels`: the label of the training image it started from), because the encoder
reads one; its mixture still spans all classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cvae.models.losses import free_bits_kl, kl_divergence, kl_per_dimension, normal_log_density

PRIORS = ("standard", "mog", "vamp")
DEFAULT_COMPONENTS = {"standard": 1, "mog": 10, "vamp": 500}  # vamp: the paper's K
CHUNK_VALUES = 2**24  # values per intermediate (rows x components x dims) of a mixture density
# Gauss-Hermite rule for E_q[log p_d(z_d)] of one dimension (the per-dimension KL of a mixture)
_NODES, _WEIGHTS = np.polynomial.hermite.hermgauss(20)

Encode = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


def check_prior(kind: object, components: object, free_bits: float = 0.0) -> int:
    """The number of components of prior `kind` (`components` None: its default), or a
    one-line error naming the key."""
    if kind not in PRIORS:
        raise ValueError(f"model.prior={kind!r} is not one of {', '.join(PRIORS)}")
    if components is None:
        components = DEFAULT_COMPONENTS[kind]
    if not isinstance(components, int) or isinstance(components, bool) or components < 1:
        raise ValueError(f"model.prior_components must be an integer >= 1, got {components!r}")
    if kind == "standard" and components != 1:
        raise ValueError(
            f"model.prior_components={components}: model.prior=standard is "
            "one fixed Gaussian (mixtures: model/prior=mog or vamp)"
        )
    if free_bits > 0 and components > 1:
        raise ValueError(_free_bits_refusal(kind, components, free_bits))
    return components


def _free_bits_refusal(kind: str, components: int, free_bits: float) -> str:
    return (
        f"model.free_bits={free_bits} floors the KL of each latent dimension, but a {kind} "
        f"prior of model.prior_components={components} does not factorise over them: set "
        "model.free_bits=0 (or model.prior_components=1)"
    )


class Prior(nn.Module):
    """p(z) over `latent_dim` dimensions, `components` diagonal Gaussians mixed (1: one)."""

    kind = ""

    def __init__(self, latent_dim: int, components: int = 1) -> None:
        super().__init__()
        self.latent_dim, self.components_count = latent_dim, components

    @property
    def factorised(self) -> bool:
        """Whether log p(z) is a sum over dimensions (one diagonal Gaussian): then the KL has
        a closed form, per-dimension terms summing to it, and free bits apply."""
        return self.components_count == 1

    def gaussian(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(mean, log_var)` of a factorised prior, `(None, None)` meaning N(0, I)."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) in nats, summed over the last dimension: shape `z.shape[:-1]`."""
        raise NotImplementedError

    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """`n` latents `(n, latent_dim)`, drawn with a CPU `generator` (the same on any
        device), each component's spread scaled by `temperature`."""
        raise NotImplementedError

    def marginal_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of each dimension under the prior, `(latent_dim,)`
        each: the scale of a latent traversal."""
        raise NotImplementedError

    def kl(
        self, mu: torch.Tensor, log_var: torch.Tensor, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        """KL(q(z | x) || p(z)) per row `(B,)`: the closed form when the prior factorises,
        else log q(z | x) - log p(z) at the posterior sample `z` (`(B, D)`, or `(n, B, D)`:
        the mean over the `n` samples)."""
        if self.factorised:
            return kl_divergence(mu, log_var, *self.gaussian())
        if z is None:
            raise ValueError(f"a {self.kind} prior's KL is estimated from a posterior sample z")
        with torch.autocast(z.device.type, enabled=False):
            z, mu, log_var = z.float(), mu.float(), log_var.float()
            estimate = normal_log_density(z, mu, log_var) - self.log_prob(z)
        return estimate if estimate.ndim == 1 else estimate.mean(0)

    def kl_per_dimension(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """`(B, D)`: a factorised prior's closed-form KL of each dimension (they sum to the
        KL); otherwise the KL of each dimension's posterior q(z_d | x) to the prior's
        marginal p(z_d) (a one-dimensional mixture, by Gauss-Hermite quadrature): how far
        the dimension's posterior is from what the prior says of it alone. Those do not sum
        to the KL (which also counts the dependence between dimensions)."""
        if self.factorised:
            return kl_per_dimension(mu, log_var, *self.gaussian())
        return self._marginal_kl(mu, log_var)

    def free_bits_kl(
        self, mu: torch.Tensor, log_var: torch.Tensor, free_bits: float
    ) -> torch.Tensor:
        """The batch-mean KL with each dimension floored at `free_bits` nats (`losses`);
        refused in one line for a prior that does not factorise."""
        if not self.factorised:
            raise ValueError(_free_bits_refusal(self.kind, self.components_count, free_bits))
        return free_bits_kl(mu, log_var, free_bits, *self.gaussian())

    def _marginal_kl(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Inside, a prior with parameters computes them once (evaluation, where they do not
        change between the calls of one estimate)."""
        yield

    def images_wanted(self) -> int:
        """How many training images this prior wants to start from (VampPrior: its
        pseudo-inputs, until they are set)."""
        return 0

    def extra_repr(self) -> str:
        return f"latent_dim={self.latent_dim}, components={self.components_count}"


class StandardNormal(Prior):
    """N(0, I): no parameters, and exactly what the model did before priors existed."""

    kind = "standard"

    def gaussian(self) -> tuple[None, None]:
        return None, None

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return normal_log_density(z)

    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """N(0, temperature^2 I), drawn on the CPU (the draws of checkpoints from before
        priors, bit for bit)."""
        return temperature * torch.randn(n, self.latent_dim, generator=generator)

    def marginal_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.latent_dim), torch.ones(self.latent_dim)


class GaussianMixture(Prior):
    """A mixture of diagonal Gaussians, given by `components()`: its density, samples and
    moments. Subclasses say where the components come from."""

    def __init__(self, latent_dim: int, components: int) -> None:
        super().__init__(latent_dim, components)
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(means (K, D), log_vars (K, D), log_weights (K,))`, float32."""
        raise NotImplementedError

    def _components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._cached if self._cached is not None else self.components()

    @contextmanager
    def frozen(self) -> Iterator[None]:
        self._cached = self.components()
        try:
            yield
        finally:
            self._cached = None

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        means, log_vars, _ = self._components()
        return means[0], log_vars[0]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log sum_k w_k N(z; m_k, v_k). The squared distances come from matrix products,
        sum_d (z_d - m_kd)^2 / v_kd = z^2 . 1/v_k - 2 z . m_k/v_k + m_k^2 . 1/v_k, instead of
        a `(rows, K, D)` difference: faster for the VampPrior's training step. In float64,
        as the three terms can be large and nearly cancel (a posterior variance of 1e-3 scales
        them by 1000); in chunks of rows whose `(rows, K)` table stays near `CHUNK_VALUES`."""
        means, log_vars, log_weights = self._components()
        with torch.autocast(z.device.type, enabled=False):
            rows = z.reshape(-1, self.latent_dim).double()
            means, log_vars = means.double(), log_vars.double()
            precision = torch.exp(-log_vars)  # (K, D)
            scaled_means = means * precision
            constant = (means * scaled_means + log_vars).sum(1) + self.latent_dim * math.log(
                2 * math.pi
            )
            per_chunk = max(1, CHUNK_VALUES // len(log_weights))
            parts = []
            for chunk in rows.split(per_chunk):
                squared = chunk.pow(2) @ precision.T - 2 * chunk @ scaled_means.T + constant
                parts.append(torch.logsumexp(log_weights.double() - 0.5 * squared, dim=1))
            return torch.cat(parts).float().reshape(z.shape[:-1])

    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """A component by its weight, then m_k + temperature * sqrt(v_k) * eps: temperature
        narrows each component around its mean (0: the means), not the whole mixture
        towards the origin, which need not be a likely point of it."""
        means, log_vars, log_weights = self._components()
        which = torch.multinomial(
            log_weights.detach().exp().cpu(), n, replacement=True, generator=generator
        ).to(means.device)
        eps = torch.randn(n, self.latent_dim, generator=generator).to(means)
        return means[which] + temperature * torch.exp(0.5 * log_vars[which]) * eps

    def marginal_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        means, log_vars, log_weights = self._components()
        weights = log_weights.exp()[:, None]
        mean = (weights * means).sum(0)
        second = (weights * (log_vars.exp() + means.pow(2))).sum(0)
        return mean, (second - mean.pow(2)).clamp_min(0).sqrt()

    def _marginal_kl(self, mu: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
        """KL(N(mu_d, v_d) || sum_k w_k N(m_kd, v_kd)) per dimension: minus the entropy of
        the Gaussian, minus E_q[log p_d] by Gauss-Hermite quadrature (20 nodes)."""
        means, log_vars, log_weights = (t.to(mu.dtype) for t in self._components())
        nodes = torch.as_tensor(_NODES, dtype=mu.dtype, device=mu.device)
        weights = torch.as_tensor(_WEIGHTS, dtype=mu.dtype, device=mu.device) / math.sqrt(math.pi)
        # per dimension d, node i, component k: log w_k + log N(z_di; m_kd, v_kd)
        m = means.T[:, None, :, None]  # (D, 1, K, 1)
        lv = log_vars.T[:, None, :, None]
        rows = max(1, CHUNK_VALUES // (self.latent_dim * len(nodes) * len(log_weights)))
        expected = []
        for mu_rows, lv_rows in zip(mu.split(rows), log_var.split(rows), strict=True):
            z = mu_rows[..., None] + math.sqrt(2) * torch.exp(0.5 * lv_rows)[..., None] * nodes
            log_p = torch.logsumexp(
                normal_log_density(z[..., None, None], m, lv) + log_weights, dim=-1
            )  # (rows, D, nodes)
            expected.append((log_p * weights).sum(-1))
        negative_entropy = -0.5 * (1 + math.log(2 * math.pi) + log_var)
        return negative_entropy - torch.cat(expected)


class MixtureOfGaussians(GaussianMixture):
    """`mog`: K diagonal Gaussians with learnable means, variances and weights. The means
    start at N(0, I) draws, so the components differ (identical ones would get identical
    gradients and stay one), the variances at 1 and the weights equal."""

    kind = "mog"

    def __init__(self, latent_dim: int, components: int) -> None:
        super().__init__(latent_dim, components)
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.log_vars = nn.Parameter(torch.zeros(components, latent_dim))
        self.weight_logits = nn.Parameter(torch.zeros(components))

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.means, self.log_vars, torch.log_softmax(self.weight_logits, dim=0)


class VampPrior(GaussianMixture):
    """`vamp`: p(z) = 1/K sum_k q(z | u_k), the encoder's posteriors of K pseudo-inputs u_k,
    free parameters in [0, 1] of the image's shape (stored as logits, read through a
    sigmoid), encoded afresh at every use. They start as random images; the model sets them
    to the first K training images when training starts (`CVAE.on_fit_start`, unless
    `initialised`: a resumed or already trained model keeps its own). With BatchNorm in the
    encoder the pseudo-inputs are a batch of their own (and count in its running statistics).

    `encode(images, labels)` is the model's encoder, bound with `bind`: a reference, not a
    submodule, so its parameters are not saved twice. `num_classes` > 0 (a conditional
    model) gives each pseudo-input a class, `pseudo_labels`, which the encoder reads with it.
    """

    kind = "vamp"

    def __init__(
        self, latent_dim: int, components: int, image_shape: Sequence[int], num_classes: int = 0
    ) -> None:
        super().__init__(latent_dim, components)
        start = torch.rand(components, *image_shape).clamp(0.01, 0.99)
        self.pseudo_logits = nn.Parameter(torch.logit(start))
        labels = torch.arange(components) % num_classes if num_classes else None
        self.register_buffer("pseudo_labels", labels)
        self.register_buffer("initialised", torch.tensor(False))
        self._encode: Encode | None = None

    def bind(self, encode: Encode) -> None:
        """The encoder the pseudo-inputs go through: `encode(images, labels) -> (mu, log_var)`."""
        self._encode = encode

    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs as images in [0, 1], `(K, C, H, W)`."""
        return torch.sigmoid(self.pseudo_logits)

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._encode is None:
            raise RuntimeError("VampPrior.bind(encode) was not called")
        mu, log_var = self._encode(self.pseudo_inputs(), self.pseudo_labels)
        count = self.components_count
        log_weights = torch.full((count,), -math.log(count), device=mu.device)
        return mu.float(), log_var.float(), log_weights

    def images_wanted(self) -> int:
        return 0 if bool(self.initialised) else self.components_count

    @torch.no_grad()
    def initialise(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Pseudo-inputs from `images` (uint8, or floats in [0, 1]; cycled if fewer than K)
        and, for a conditional prior, their `labels`."""
        index = torch.arange(self.components_count) % len(images)
        images = images[index]
        images = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        self.pseudo_logits.copy_(torch.logit(images.clamp(0.01, 0.99)))
        if self.pseudo_labels is not None and labels is not None:
            self.pseudo_labels.copy_(torch.as_tensor(labels)[index])
        self.initialised.fill_(True)


def build_prior(
    kind: str,
    components: int,
    latent_dim: int,
    image_shape: Sequence[int],
    num_classes: int = 0,
) -> Prior:
    """The prior `kind` (checked by `check_prior`) of `components` components."""
    if kind == "mog":
        return MixtureOfGaussians(latent_dim, components)
    if kind == "vamp":
        return VampPrior(latent_dim, components, image_shape, num_classes)
    return StandardNormal(latent_dim)
