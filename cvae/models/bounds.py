"""The bounds on log p(x) that a VAE trains on and reports, one place for each.

- `loss_terms`: the training objective, the ELBO (KL weighted by beta, floored by free bits)
  or, with `iw_samples` > 1, the importance-weighted bound (IWAE, Burda et al., 2016);
- `elbo` / `elbo_terms`: the evidence lower bound per image and its parts;
- `log_likelihood`: the importance-weighted estimate of log p(x) with K samples.

The IWAE bound and the estimate share `_log_weight_terms`. `Bounds` is a mixin of `CVAE`
(`cvae.py`): it uses the model's `encode`, `decode_logits`, `_decoder_input`, `decoder`,
`likelihood`, `prior`, `class_indices` and `hparams`, and adds no state. Where a second
stochastic layer would go: a model with more levels brings its own bounds (the typed
posterior of `latents.py` is what leaves the model).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from cvae.models.inference import FastDecoder
from cvae.models.latents import Gaussian, Posterior
from cvae.models.losses import normal_log_density
from cvae.models.networks import reparameterize
from cvae.models.user_api import Labels, evaluating
from cvae.pixels import unit_range


class Bounds:
    """ELBO, IWAE and importance-weighted likelihood of `CVAE`."""

    def loss_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None = None,
        beta: float | None = None,
        free_bits: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """Batch means of the loss and its parts, each per image: `recon` = -log p(x | z),
        `kl` the KL to the prior (closed form, or for a mixture prior the one-sample
        estimate at the posterior sample); the loss weighs the KL (floored by `free_bits`,
        which needs a prior that factorises) with `beta`
        (default: the configured one). `labels`: the classes of a conditional model. With
        `iw_samples` > 1 the loss is the negative importance-weighted bound instead, its
        log-ratio log p(z) / q(z | x) weighed by `beta` (`recon`: the samples' mean)."""
        x = unit_range(x)
        encoding = self._encoding(x, labels)
        beta = self.hparams.beta if beta is None else beta
        k = self.hparams.get("iw_samples", 1)
        if k > 1:
            return self._iw_terms(x, labels, encoding, beta, k)
        return self._one_sample_terms(x, labels, encoding, beta, free_bits)

    def _encoding(self, x: torch.Tensor, labels: torch.Tensor | None) -> Gaussian:
        """What the bounds compute once per batch of images before drawing latents: here the
        posterior (its one level). A model with more levels returns what its top-down path
        needs."""
        return self.encode(x, labels).top

    def _one_sample_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        encoding: Gaussian,
        beta: float,
        free_bits: float,
    ) -> dict[str, torch.Tensor]:
        """`loss_terms` of the ELBO, one posterior sample per image."""
        mu, log_var = encoding
        z = reparameterize(mu, log_var)
        logits = self.decode_logits(z, labels)
        recon = -self.likelihood(logits, x).mean()
        mu, log_var = mu.float(), log_var.float()
        kl = self.prior.kl(mu, log_var, z).mean()
        objective_kl = self.prior.free_bits_kl(mu, log_var, free_bits) if free_bits > 0 else kl
        return {"loss": recon + beta * objective_kl, "recon": recon, "kl": kl}

    def _iw_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        encoding: Gaussian,
        beta: float,
        k: int,
    ) -> dict[str, torch.Tensor]:
        """`loss_terms` of the IWAE bound: `k` samples per image decoded in one call. `kl`:
        the closed form where there is one (`_closed_form_kl`), else the mean over the `k`
        samples of log q(z | x) - log p(z)."""
        log_px, level_ratios = self._log_weight_terms(
            x, self.class_indices(labels, len(x)), encoding, k
        )
        log_ratio = level_ratios.sum(0)
        bound = torch.logsumexp(log_px + beta * log_ratio, dim=0) - math.log(k)
        kl = self._closed_form_kl(encoding)
        if kl is None:
            kl = -log_ratio.mean(0)
        terms = {"loss": -bound.mean(), "recon": -log_px.mean(), "kl": kl.mean()}
        return terms | self._kl_per_level(-level_ratios.mean(dim=(1, 2)))

    def _kl_per_level(self, kls: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss terms naming each level's KL (`kl_level_<i>`, level 0 the top), logged
        as `train/kl_level_<i>` and `val/...`: none for a model of one level."""
        return {}

    def _closed_form_kl(self, encoding: Gaussian) -> torch.Tensor | None:
        """KL(q(z | x) || p(z)) per image in closed form, None where there is none (a
        mixture prior)."""
        if not self.prior.factorised:
            return None
        mu, log_var = encoding
        return self.prior.kl(mu.float(), log_var.float())

    def _log_weight_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        encoding: Gaussian,
        n: int,
        generator: torch.Generator | None = None,
        logits_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two parts of the importance weights of `n` posterior samples per image:
        log p(x | z) `(n, B)` and, per latent level, log p(z) - log q(z | x) `(levels, n, B)`
        (their sum over levels is the weights' latent part). The IWAE training bound and
        the likelihood estimate share them; the `n * B` latents are decoded in one call
        (`logits_of`: another computation of `decoder.logits` of the decoder's inputs)."""
        mu, log_var = encoding
        z = reparameterize(mu, log_var, generator, samples=n)  # (n, B, latent)
        repeated = None if labels is None else labels.repeat(n)
        inputs = self._decoder_input(z.flatten(0, 1), repeated)
        logits = (logits_of or self.decoder.logits)(inputs)
        log_px = self.likelihood(logits.unflatten(0, (n, len(x))), x)  # x broadcast over n
        z, mu, log_var = z.float(), mu.float(), log_var.float()
        return log_px, (self.prior.log_prob(z) - normal_log_density(z, mu, log_var))[None]

    def elbo(
        self,
        x: torch.Tensor,
        labels: Labels = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The evidence lower bound of each image in nats (one posterior sample), with the
        decoder's proper density: shape (B,). Not scaled by beta. A conditional model's
        bound is on log p(x | y), `y` the `labels`."""
        with evaluating(self):
            log_px, kl_levels, _ = self.elbo_terms(x, labels, generator)
            return log_px - kl_levels.sum(0)

    def elbo_terms(
        self,
        x: torch.Tensor,
        labels: Labels = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Posterior]:
        """`(log p(x | z), KL per level, posterior)` of each image, one posterior sample:
        the parts of `elbo`, for callers that report them separately, and q(z | x). The KL
        is `(levels, B)`, one row here (closed form, or for a mixture prior log q(z | x) -
        log p(z) at the same sample); its sum over levels is the ELBO's KL."""
        labels = self.class_indices(labels, len(x))
        x = unit_range(x.to(self.device))
        posterior = self.encode(x, labels)
        mu, log_var = posterior.top
        z = reparameterize(mu, log_var, generator)
        logits = self.decode_logits(z, labels)
        return self.likelihood(logits, x), self.prior.kl(mu, log_var, z)[None], posterior

    def log_likelihood(
        self,
        x: torch.Tensor,
        labels: Labels = None,
        k: int = 1000,
        generator: torch.Generator | None = None,
        max_decodes: int | None = None,
        decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Importance-weighted estimate of log p(x) in nats with `k` posterior samples (IWAE):
        log mean_k p(x | z_k) p(z_k) / q(z_k | x). A lower bound that tightens as `k` grows;
        `k = 1` is the ELBO. Shape (B,). A conditional model estimates log p(x | y), `y` the
        `labels`.

        Samples are decoded `max_decodes // len(x)` per image at a time (one decoder call of
        about `max_decodes` latents), so any `k` fits in memory; the running log-sum-exp stays
        on the device (no host round trip until the caller reads the result), under
        `torch.inference_mode`. The draws depend on `generator`, `len(x)` and `max_decodes`.
        `decoder` computes `self.decoder.logits`: by default a `FastDecoder` copy made for
        this call (the same logits, faster on CPU: docs/reports/evaluation-speed.md; what
        `cvae.evaluate` uses), or another callable
        (`decoder=model.decoder.logits`: the module itself). `max_decodes` None: the fast
        decoder's `decodes_per_call()` (4096 for another `decoder`).
        """
        if k < 1:
            raise ValueError(f"eval.iw_samples must be >= 1, got {k}")
        labels = self.class_indices(labels, len(x))
        if decoder is None:
            decoder = self.fast_logits()
        if max_decodes is None:
            per_call = getattr(decoder, "decodes_per_call", None)
            max_decodes = per_call() if per_call is not None else 4096
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), self.prior.frozen():
                x = unit_range(x.to(self.device))
                encoding = self._encoding(x, labels)
                per_call = max(1, max_decodes // len(x))
                total = torch.full((len(x),), -math.inf, device=self.device)
                for start in range(0, k, per_call):
                    n = min(per_call, k - start)
                    log_px, log_ratio = self._log_weight_terms(
                        x, labels, encoding, n, generator, decoder
                    )
                    weights = log_px + log_ratio.sum(0)
                    total = torch.logaddexp(total, torch.logsumexp(weights, dim=0))
                return total - math.log(k)
        finally:
            self.train(was_training)

    def fast_logits(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """What `log_likelihood` computes `decoder.logits` with by default: a `FastDecoder`
        copy (None: the decoder itself)."""
        return FastDecoder(self.decoder)
