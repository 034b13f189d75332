"""`CVAE`: the Lightning module that trains the encoder and decoder on the negative ELBO."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property, partial
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch

from cvae.checkpointing import capture_rng_states, restore_rng_states
from cvae.models.classes import ClassVocabulary
from cvae.models.conditioning import LabelConditioning, check_class_names
from cvae.models.inference import FastDecoder
from cvae.models.likelihoods import build_likelihood, check_recon_loss
from cvae.models.losses import BETA_SCHEDULES, beta_at, normal_log_density
from cvae.models.networks import (
    DOWNSAMPLING,
    UPSAMPLING,
    Decoder,
    Encoder,
    reparameterize,
    unit_range,
)
from cvae.models.priors import VampPrior, build_prior, check_prior

if TYPE_CHECKING:  # the model does not import the samplers: they take it
    from cvae.samplers import LatentSampler

log = logging.getLogger(__name__)
# What the user-facing methods take as labels: one class (index or name) for every image, or
# one per image.
Labels = int | str | Sequence[int | str] | torch.Tensor | None


class CVAE(pl.LightningModule):
    """Convolutional VAE: loss = -log p(x | z) + beta * KL, per image, averaged over the batch.

    `recon_loss` names the decoder's likelihood (`likelihoods.py`); `beta_schedule` and
    `warmup_steps` warm the KL weight up (training only), and `free_bits` floors each latent
    dimension's KL in the training objective. `iw_samples` > 1 trains on the importance-
    weighted bound (IWAE, Burda et al., 2016) of that many posterior samples instead of the
    ELBO: a tighter bound, so a better likelihood, for `iw_samples` decodes per image. Logged
    `kl` is always the true KL, and `val/loss` and `test/loss` always use the final `beta`, so
    epochs stay comparable. A training step with a non-finite loss or gradients is skipped and
    counted (`train/skipped_steps`); `max_bad_steps` in a row stop training.

    `conditional` conditions encoder and decoder on the class label (`conditioning.py`):
    every method that takes images or latents then takes `labels` too (class indices or
    names of `class_names`, which the data provides and the checkpoint keeps).

    `prior` is p(z) (`priors.py`, `self.prior`): `standard` N(0, I), `mog` a learnable
    mixture of `prior_components` diagonal Gaussians, `vamp` the VampPrior of that many
    pseudo-inputs (None: 10 for mog, 500 for vamp). Every use of p(z) goes through it: the
    KL (closed form when the prior factorises, else a one-sample estimate), the importance
    weights, sampling, traversals and per-dimension KLs. It is the same for every class.

    Every constructor argument but `optimizer` and `scheduler` is a plain value saved in the
    checkpoint, so `CVAE.load_from_checkpoint(path)` needs no config. `optimizer` is a
    factory taking `(params, lr=...)` (default: fused `torch.optim.Adam`); `scheduler` an optional
    factory taking the optimizer, stepped once per epoch.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        latent_dim: int = 512,
        hidden_channels: Sequence[int] = (16, 32, 64, 128),
        kernel_size: int = 4,
        downsample: str = "stride",
        upsample: str = "transpose",
        batch_norm: bool = False,
        residual_blocks: int = 0,
        recon_loss: str = "mse",
        sigma: float = 2**-0.5,
        min_sigma: float = 0.0025,
        beta: float = 1.0,
        beta_schedule: str = "constant",
        warmup_steps: int = 0,
        free_bits: float = 0.0,
        iw_samples: int = 1,
        max_bad_steps: int = 10,
        channels_last: bool = False,
        compile: bool = False,
        lr: float = 1e-3,
        conditional: bool = False,
        class_names: Sequence[str] | None = None,
        prior: str = "standard",
        prior_components: int | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
    ) -> None:
        super().__init__()
        _validate(in_channels, image_size, latent_dim, hidden_channels, kernel_size, downsample,
                  upsample, recon_loss, beta, lr)  # fmt: skip
        _validate_aids(sigma, min_sigma, beta_schedule, warmup_steps, free_bits, residual_blocks,
                       max_bad_steps, iw_samples)  # fmt: skip
        hidden_channels = [int(c) for c in hidden_channels]
        prior_components = check_prior(prior, prior_components, free_bits)  # the number saved
        if conditional:  # plain strings in the checkpoint
            class_names = check_class_names(class_names)
        elif class_names is not None:
            class_names = [str(name) for name in class_names]
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, fused=True)
        self.scheduler_factory = scheduler
        # The label enters as one more input plane of the encoder and a code beside z.
        self.conditioning = LabelConditioning(len(class_names), image_size) if conditional else None
        label_plane = 1 if conditional else 0
        label_code = self.conditioning.code.embedding_dim if conditional else 0
        self.encoder = Encoder(
            in_channels + label_plane,
            hidden_channels,
            image_size,
            latent_dim,
            kernel_size,
            downsample,
            batch_norm,
            residual_blocks,
        )
        self.decoder = Decoder(
            in_channels,
            hidden_channels,
            image_size,
            latent_dim + label_code,
            kernel_size,
            batch_norm,
            residual_blocks,
            upsample,
        )
        self.likelihood = build_likelihood(recon_loss, sigma, min_sigma)
        # Built last: a prior's random start leaves the networks' initialisation as it was.
        self.prior = build_prior(prior, prior_components, latent_dim,
                                 (in_channels, image_size, image_size),
                                 len(class_names) if conditional else 0)  # fmt: skip
        if isinstance(self.prior, VampPrior):
            self.prior.bind(self.encode)
        if channels_last:  # NHWC: the layout oneDNN and tensor cores convolve fastest
            self.to(memory_format=torch.channels_last)
        self.skipped_steps = 0  # training steps skipped for a non-finite loss or gradients
        self.bad_steps_in_a_row = 0
        self._last_loss = torch.tensor(0.0)
        self._epoch_loss, self._epoch_steps = torch.zeros(()), 0  # for train/loss_epoch
        self._rng_states: dict | None = None  # from a checkpoint, set when training resumes

    # --- the model -------------------------------------------------------------------------
    @property
    def conditional(self) -> bool:
        """Whether encoder and decoder read the class label (old checkpoints: false)."""
        return bool(self.hparams.get("conditional", False))

    @property
    def class_names(self) -> list[str]:
        """Names of the classes a conditional model draws (label `i` is `class_names[i]`)."""
        return list(self.hparams.get("class_names") or [])

    @cached_property
    def classes(self) -> ClassVocabulary:
        """The class names as a lookup: names, folder names and indices to indices."""
        return ClassVocabulary(self.class_names)

    def class_indices(
        self, labels: Labels, count: int | None = None, key: str = "labels"
    ) -> torch.Tensor | None:
        """`labels` as a `(count,)` tensor of class indices on the model's device: one label
        (index, name or folder name, any case: `ClassVocabulary`) for all `count` images, or
        one per image. None for an unconditional model; a one-line error naming `key` when
        they do not fit."""
        if not self.conditional:
            if labels is not None:
                raise ValueError(f"{key} given, but this model is not conditional "
                                 "(trained with model.conditional=false)")  # fmt: skip
            return None
        if labels is None:
            names = ", ".join(self.class_names)
            raise ValueError(f"{key} is required: this model is conditional on the class "
                             f"(model.conditional=true), one of {names}")  # fmt: skip
        return self.classes.indices(labels, count, key).to(self.device)

    def encode(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters `(mu, log_var)` of images `x` (uint8, or floats in [0, 1]),
        of class `labels` (a conditional model's class indices, `(B,)`)."""
        x = unit_range(x)
        labels = self.class_indices(labels, len(x))
        if labels is not None:
            x = self.conditioning.encoder_input(x, labels)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] decoded from latents `z` of shape `(B, latent_dim)`, of class
        `labels` (a conditional model's class indices, `(B,)`)."""
        return torch.sigmoid(self.decode_logits(z, labels))

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output before its Sigmoid, what `self.likelihood` scores, of latents
        `z` and (a conditional model) class `labels`."""
        return self.decoder.logits(self._decoder_input(z, self.class_indices(labels, len(z))))

    def _decoder_input(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """`z`, or for a conditional model `z` beside the class code of `labels`."""
        if labels is None:
            return z
        return self.conditioning.decoder_input(z, self.conditioning.code(labels))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, log_var = self.encode(x, labels)
        return self.decode(reparameterize(mu, log_var), labels), mu, log_var

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
        mu, log_var = self.encode(x, labels)
        beta = self.hparams.beta if beta is None else beta
        k = self.hparams.get("iw_samples", 1)
        if k > 1:
            return self._iw_terms(x, labels, mu, log_var, beta, k)
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
        mu: torch.Tensor,
        log_var: torch.Tensor,
        beta: float,
        k: int,
    ) -> dict[str, torch.Tensor]:
        """`loss_terms` of the IWAE bound: `k` samples per image decoded in one call. `kl`:
        the closed form, or for a mixture prior the mean over the `k` samples of
        log q(z | x) - log p(z)."""
        log_px, log_ratio = self._log_weight_terms(
            x, self.class_indices(labels, len(x)), mu, log_var, k
        )
        bound = torch.logsumexp(log_px + beta * log_ratio, dim=0) - math.log(k)
        if self.prior.factorised:
            kl = self.prior.kl(mu.float(), log_var.float())
        else:
            kl = -log_ratio.mean(0)
        return {"loss": -bound.mean(), "recon": -log_px.mean(), "kl": kl.mean()}

    def _log_weight_terms(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        mu: torch.Tensor,
        log_var: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        logits_of: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two parts of the importance weights of `n` posterior samples per image, each
        `(n, B)`: log p(x | z) and log p(z) - log q(z | x). The IWAE training bound and the
        likelihood estimate share them; the `n * B` latents are decoded in one call."""
        z = reparameterize(mu, log_var, generator, samples=n)  # (n, B, latent)
        repeated = None if labels is None else labels.repeat(n)
        logits = (logits_of or self.decode_logits)(z.flatten(0, 1), repeated)
        log_px = self.likelihood(logits.unflatten(0, (n, len(x))), x)  # x broadcast over n
        z, mu, log_var = z.float(), mu.float(), log_var.float()
        return log_px, self.prior.log_prob(z) - normal_log_density(z, mu, log_var)

    def current_beta(self) -> float:
        """The KL weight of this training step under `beta_schedule`."""
        hp = self.hparams
        return beta_at(self.global_step, hp.beta, hp.beta_schedule, hp.warmup_steps)

    # --- for users -------------------------------------------------------------------------
    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode (BatchNorm running statistics) and no gradients, then back as it was."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def sample(
        self,
        n: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        labels: Labels = None,
        sampler: LatentSampler | None = None,
    ) -> torch.Tensor:
        """`n` new images decoded from latents of the prior (`sample_latents`), or of a
        fitted ex-post `sampler` (`cvae.samplers`: `gmm`, `two_stage`); a conditional model
        draws the class `labels` (one for all, or one per image; indices or names)."""
        labels = self.class_indices(labels, n)
        if sampler is None:
            z = self.sample_latents(n, temperature, generator)
        else:
            z = sampler.sample(n, generator, labels, temperature).to(self.device)
        with self._inference():
            return self.decode(z, labels)

    def sample_latents(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`n` latents `(n, latent_dim)` from the prior, on the model's device, drawn with a
        CPU `generator`: `standard` N(0, temperature^2 I) (the draws of models from before
        priors, bit for bit); a mixture picks a component by its weight and scales that
        component's spread by `temperature`. The same for every class."""
        with self._inference():
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
            raise ValueError("sample_classes needs a conditional model "
                             "(trained with model.conditional=true)")  # fmt: skip
        z = self.sample_latents(per_class, temperature, generator).repeat(len(labels), 1)
        with self._inference():
            return self.decode(z, labels.repeat_interleave(per_class))

    def reconstruct(self, x: torch.Tensor, labels: Labels = None) -> torch.Tensor:
        """Images decoded from their posterior means: the model's best guess of `x`. A
        conditional model decodes with the classes the images were encoded with."""
        labels = self.class_indices(labels, len(x))
        with self._inference():
            mu, _ = self.encode(x.to(self.device), labels)
            return self.decode(mu, labels)

    def interpolate(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        steps: int = 8,
        spherical: bool = False,
        labels: Labels = None,
    ) -> torch.Tensor:
        """`steps` images decoded along the path between the posterior means of two images
        `(C, H, W)`: a straight line, or a great circle (`spherical`), which keeps the norm
        that latents of a Gaussian prior concentrate at. A conditional model takes the two
        images' `labels`; the class code walks from one to the other along with `z`."""
        labels = self.class_indices(labels, 2)
        with self._inference():
            (a, b), _ = self.encode(torch.stack([x1, x2]).to(self.device), labels)
            t = torch.linspace(0, 1, steps, device=self.device)[:, None]
            z = (1 - t) * a + t * b
            if spherical:
                omega = torch.arccos(torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1))
                if omega.abs() > 1e-6:  # (parallel means: the great circle is the line)
                    z = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / omega.sin()
            if labels is None:
                return self.decode(z)
            return self._decode_between(z, labels[0], labels[1], t)

    def interpolate_classes(
        self, first: int | str, second: int | str, z: torch.Tensor, steps: int = 8
    ) -> torch.Tensor:
        """A conditional model's walk from class `first` to class `second` at fixed latents
        `z` `(n, latent_dim)`: the style kept, the class changed. `n * steps` images, the
        `steps` of each latent in a row."""
        labels = self.class_indices([first, second], 2, key="labels")
        if labels is None:
            raise ValueError("interpolate_classes needs a conditional model "
                             "(trained with model.conditional=true)")  # fmt: skip
        with self._inference():
            t = torch.linspace(0, 1, steps, device=self.device).repeat(len(z))[:, None]
            z = z.to(self.device).repeat_interleave(steps, dim=0)
            return self._decode_between(z, labels[0], labels[1], t)

    def _decode_between(
        self, z: torch.Tensor, first: torch.Tensor, second: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Decode `z` with class codes blended from `first`'s (t = 0) to `second`'s (t = 1)."""
        codes = self.conditioning.code(torch.stack([first, second]))
        code = (1 - t) * codes[0] + t * codes[1]
        return torch.sigmoid(self.decoder.logits(self.conditioning.decoder_input(z, code)))

    def elbo(
        self,
        x: torch.Tensor,
        labels: Labels = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The evidence lower bound of each image in nats (one posterior sample), with the
        decoder's proper density: shape (B,). Not scaled by beta. A conditional model's
        bound is on log p(x | y), `y` the `labels`."""
        with self._inference():
            log_px, kl, _, _ = self.elbo_terms(x, labels, generator)
            return log_px - kl

    def elbo_terms(
        self,
        x: torch.Tensor,
        labels: Labels = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(log p(x | z), KL, mu, log_var)` of each image, one posterior sample: the parts
        of `elbo`, for callers that report them separately (KL: closed form, or for a
        mixture prior log q(z | x) - log p(z) at the same sample)."""
        labels = self.class_indices(labels, len(x))
        x = unit_range(x.to(self.device))
        mu, log_var = self.encode(x, labels)
        z = reparameterize(mu, log_var, generator)
        logits = self.decode_logits(z, labels)
        return self.likelihood(logits, x), self.prior.kl(mu, log_var, z), mu, log_var

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
        this call (the same logits, 3x faster on CPU here: 3.7 s against 11.3 s for K=500
        on 64 Fashion-MNIST-sized images; what `cvae.evaluate` uses), or another callable
        (`decoder=model.decoder.logits`: the module itself). `max_decodes` None: the fast
        decoder's `decodes_per_call()` (4096 for another `decoder`).
        """
        if k < 1:
            raise ValueError(f"eval.iw_samples must be >= 1, got {k}")
        labels = self.class_indices(labels, len(x))
        if decoder is None:
            decoder = FastDecoder(self.decoder)
        if max_decodes is None:
            per_call = getattr(decoder, "decodes_per_call", None)
            max_decodes = per_call() if per_call is not None else 4096
        logits_of = lambda z, labels: decoder(self._decoder_input(z, labels))  # noqa: E731
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode(), self.prior.frozen():
                x = unit_range(x.to(self.device))
                mu, log_var = self.encode(x, labels)
                per_call = max(1, max_decodes // len(x))
                total = torch.full((len(x),), -math.inf, device=self.device)
                for start in range(0, k, per_call):
                    n = min(per_call, k - start)
                    log_px, log_ratio = self._log_weight_terms(
                        x, labels, mu, log_var, n, generator, logits_of
                    )
                    total = torch.logaddexp(total, torch.logsumexp(log_px + log_ratio, dim=0))
                return total - math.log(k)
        finally:
            self.train(was_training)

    # --- training --------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """A VampPrior's pseudo-inputs start as the first K images of the training set (the
        data module's `train_set`, already a seeded shuffle), unless they were set before
        (a resumed run, a trained model): the model reads the trainer's data, never imports
        the data wing. Without a `train_set` they stay random (said)."""
        wanted = self.prior.images_wanted()
        if not wanted:
            return
        dataset = getattr(self.trainer.datamodule, "train_set", None)
        if dataset is None or len(dataset) == 0:
            log.info("prior: %d random pseudo-inputs (no training set to start from)", wanted)
            return
        items = [dataset[i] for i in range(min(wanted, len(dataset)))]  # cycled if fewer
        images = torch.stack([torch.as_tensor(image) for image, _ in items])
        labels = torch.tensor([int(label) for _, label in items])
        self.prior.initialise(images, labels if self.conditional else None)
        log.info("prior: %d pseudo-inputs from the first %d training images", wanted, len(items))

    def setup(self, stage: str) -> None:
        """`compile`: torch.compile the encoder and decoder in place for training (the
        parameter names, so checkpoints, stay those of the eager model)."""
        if stage == "fit" and self.hparams.compile:
            self.encoder.compile()
            self.decoder.compile()

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        labels = labels if self.conditioning is not None else None
        training = stage == "train"
        if training:
            beta = self.current_beta()
            terms = self.loss_terms(
                images, labels=labels, beta=beta, free_bits=self.hparams.free_bits
            )
            self._epoch_loss += terms["loss"].detach()  # on the device: no sync per step
            self._epoch_steps += 1
            if not self._logged_step():
                return terms["loss"]
            self.log("train/beta", beta, on_step=True, on_epoch=False)  # the one used
        else:
            terms = self.loss_terms(images, labels=labels)
            terms |= self._readable_terms(images, labels, terms)
        # Training curves per step; validation and test as means over the whole split (all
        # ranks' shares of it under data-parallel training).
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, on_step=training, on_epoch=not training,
                     prog_bar=name in ("loss", "mse"), batch_size=len(images),
                     sync_dist=not training)  # fmt: skip
        return terms["loss"]

    def _readable_terms(
        self, images: torch.Tensor, labels: torch.Tensor | None, terms: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Curves that move visibly, and scores that mean the same in every run of a sweep:
        squared error per pixel of the decoded posterior means, the negative ELBO at beta = 1
        (`neg_elbo`, nats per image), and it in bits per dimension; for continuous
        likelihoods of the 8-bit data, without dequantisation (`cvae.evaluate` gives the
        bound)."""
        x = unit_range(images)
        mse = (self.reconstruct(x, labels) - x).pow(2).mean()
        dims = x[0].numel()
        neg_elbo = terms["recon"] + terms["kl"]  # at beta = 1: comparable across runs
        bits = neg_elbo / (dims * math.log(2))
        if self.likelihood.continuous:
            bits = bits + 8
        return {"mse": mse, "neg_elbo": neg_elbo, "bits_per_dim": bits}

    def on_train_epoch_start(self) -> None:
        self._epoch_loss, self._epoch_steps = torch.zeros((), device=self.device), 0

    def on_train_epoch_end(self) -> None:
        """`train/loss_epoch`: the mean training loss of the epoch, so a run shorter than
        `trainer.log_every_n_steps` has a training curve too (after a mid-epoch resume: the
        mean of the steps this process ran)."""
        if self._epoch_steps:
            self.log("train/loss_epoch", self._epoch_loss / self._epoch_steps, sync_dist=True)

    def _logged_step(self) -> bool:
        """Whether the logger records this training step (`trainer.log_every_n_steps`):
        training values are logged only then, which spares Lightning's per-step logging work."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = trainer.log_every_n_steps
        return every > 0 and (self.global_step + 1) % every == 0

    def _stop_unless_finite(self, loss: torch.Tensor, stage: str) -> None:
        """Stop before a diverged model is checkpointed (validation)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage}/loss is {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}: training stopped, the last good checkpoint is kept "
                "(try a lower model.lr or set trainer.gradient_clip_val)"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = capture_rng_states()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._rng_states = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        """A resumed run draws the random numbers the interrupted one would have drawn next:
        its generators are set to the checkpoint's as training starts again (after the
        sanity check and the loaders' set-up, before any batch is binarised or encoded)."""
        if self._rng_states is not None:
            restore_rng_states(self._rng_states)
            self._rng_states = None
        self.on_train_epoch_start()  # not called when a run resumes mid-epoch

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        loss = self._step(batch, "train")
        self._last_loss = loss.detach()  # read only when a step goes bad: no sync per step
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Non-finite gradients (a non-finite loss gives them too): drop the gradients, so
        the optimizer leaves every parameter (and its moments) as it was. One check, one
        host sync per step. Under `16-mixed` the gradient scaler does this itself (an
        overflow there is routine: it skips the step and lowers its scale)."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # The total norm is finite exactly when every gradient is (one fused pass).
        if not grads or bool(torch.nn.utils.get_total_norm(grads).isfinite()):
            self.bad_steps_in_a_row = 0
            return
        optimizer.zero_grad(set_to_none=True)
        loss = float(self._last_loss)
        what = "the gradients are not finite" if math.isfinite(loss) else f"train/loss is {loss}"
        self._skip_bad_step(what)

    def _skip_bad_step(self, what: str) -> None:
        """Count a skipped step; stop after `max_bad_steps` in a row."""
        self.bad_steps_in_a_row += 1
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        log.warning("skipped training step %d: %s (%d in a row, %d in all)", self.global_step,
                    what, self.bad_steps_in_a_row, self.skipped_steps)  # fmt: skip
        if self.bad_steps_in_a_row >= self.hparams.max_bad_steps:
            raise FloatingPointError(
                f"{what} at epoch {self.current_epoch}, step {self.global_step}: "
                f"{self.bad_steps_in_a_row} training steps in a row were skipped as non-finite, "
                "training stopped, the last good checkpoint is kept (try a lower model.lr or "
                "set trainer.gradient_clip_val)"
            )

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._stop_unless_finite(self._step(batch, "val"), "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.parameters(), lr=self.hparams.lr)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }


def _validate_aids(
    sigma: float,
    min_sigma: float,
    beta_schedule: str,
    warmup_steps: int,
    free_bits: float,
    residual_blocks: int,
    max_bad_steps: int,
    iw_samples: int = 1,
) -> None:
    for key, value in (("sigma", sigma), ("min_sigma", min_sigma)):
        if not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"model.{key} must be a number > 0, got {value!r}")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"model.beta_schedule={beta_schedule!r} is not one of {', '.join(BETA_SCHEDULES)}"
        )
    if not isinstance(residual_blocks, int) or residual_blocks < 0:
        raise ValueError(f"model.residual_blocks must be an integer >= 0, got {residual_blocks!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"model.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not isinstance(max_bad_steps, int) or max_bad_steps < 1:
        raise ValueError(f"model.max_bad_steps must be an integer >= 1, got {max_bad_steps!r}")
    if not isinstance(free_bits, (int, float)) or free_bits < 0:
        raise ValueError(f"model.free_bits must be a number >= 0, got {free_bits!r}")
    if not isinstance(iw_samples, int) or iw_samples < 1:
        raise ValueError(f"model.iw_samples must be an integer >= 1, got {iw_samples!r}")
    if iw_samples > 1 and free_bits > 0:
        raise ValueError("model.free_bits works on the ELBO's KL term: set model.free_bits=0 "
                         f"with model.iw_samples={iw_samples}")  # fmt: skip


def _validate(
    in_channels: int,
    image_size: int,
    latent_dim: int,
    hidden_channels: Sequence[int],
    kernel_size: int,
    downsample: str,
    upsample: str,
    recon_loss: str,
    beta: float,
    lr: float,
) -> None:
    """One-line errors naming the config key, raised before anything is built."""
    for key, value in (("in_channels", in_channels), ("image_size", image_size),
                       ("latent_dim", latent_dim), ("kernel_size", kernel_size)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
    if not hidden_channels or not all(isinstance(c, int) and c >= 1 for c in hidden_channels):
        raise ValueError(
            "model.hidden_channels must be a non-empty list of positive widths, "
            f"got {list(hidden_channels)}"
        )
    if kernel_size < 2:
        raise ValueError(f"model.kernel_size must be >= 2, got {kernel_size}")
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"model.downsample={downsample!r} is not one of {', '.join(DOWNSAMPLING)}")
    if upsample not in UPSAMPLING:
        raise ValueError(f"model.upsample={upsample!r} is not one of {', '.join(UPSAMPLING)}")
    check_recon_loss(recon_loss)
    if not isinstance(beta, (int, float)) or not beta >= 0 or math.isinf(beta):
        raise ValueError(f"model.beta must be a finite number >= 0, got {beta!r}")
    if not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
        raise ValueError(f"model.lr must be a number > 0, got {lr!r}")
    factor = 2 ** len(hidden_channels)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"model.image_size={image_size} (data.image_size) is not divisible by {factor}: "
            f"model.hidden_channels has {len(hidden_channels)} blocks, each halving the image"
        )
