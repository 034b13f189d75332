"""`CVAE`: the Lightning module that trains the encoder and decoder on the negative ELBO.

This file holds what the model is (its parts, built from plain settings checked by
`settings.py`; encoding and decoding; class lookup) and how Lightning trains it. Its bounds
on log p(x) live in `bounds.py`, its user API (sampling, reconstruction, interpolation) in
`user_api.py`: two mixins that add methods, no state, so checkpoint keys are the module
attributes built here.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import cached_property, partial

import lightning.pytorch as pl
import torch
from torch import nn

from cvae.models.bounds import Bounds
from cvae.models.classes import ClassVocabulary
from cvae.models.conditioning import (
    LabelConditioning,
    LabelledDecoder,
    LabelledEncoder,
    check_class_names,
)
from cvae.models.latents import Gaussian, Posterior
from cvae.models.likelihoods import build_likelihood
from cvae.models.losses import beta_at
from cvae.models.networks import Decoder, Encoder, reparameterize
from cvae.models.priors import VampPrior, build_prior, check_prior
from cvae.models.settings import check_network, check_skip_factor, check_training
from cvae.models.user_api import Labels, UserAPI
from cvae.pixels import is_binary, unit_range
from cvae.rng import capture_rng_states, restore_rng_states

log = logging.getLogger(__name__)
# The defaults of settings that changed after checkpoints were written without them: a
# checkpoint that does not name one was trained with the value here, not today's default.
# `skip_updates_above`: updates that set the running gradient-norm level before any is
# skipped, and the weight of each accepted norm in it
SKIP_WARMUP, SKIP_MOMENTUM = 100, 0.01
LEGACY_DEFAULTS = {"in_channels": 3, "upsample": "transpose", "recon_loss": "mse"}


class CVAE(Bounds, UserAPI, pl.LightningModule):
    """Convolutional VAE: loss = -log p(x | z) + beta * KL, per image, averaged over the batch.

    `recon_loss` names the decoder's likelihood (`likelihoods.py`; `mixture_components`
    logistics per pixel for `logistic_mixture`); `beta_schedule` and
    `warmup_steps` warm the KL weight up (training only), and `free_bits` floors each latent
    dimension's KL in the training objective. `iw_samples` > 1 trains on the importance-
    weighted bound (IWAE, Burda et al., 2016) of that many posterior samples instead of the
    ELBO: a tighter bound, so a better likelihood, for `iw_samples` decodes per image. Logged
    `kl` is always the true KL, and `val/loss` and `test/loss` always use the final `beta`, so
    epochs stay comparable. A training step with a non-finite loss or gradients is skipped and
    counted (`train/skipped_steps`); `max_bad_steps` in a row stop training.
    `skip_updates_above` (None: off) skips an update whose gradient norm is more than that
    many times its running level, an exponential average of the accepted updates' norms
    (VDVAE's guard against gradient spikes), counted in `train/skipped_updates`.

    `conditional` conditions encoder and decoder on the class label (`conditioning.py`):
    every method that takes images or latents then takes `labels` too (class indices or
    names of `class_names`, which the data provides and the checkpoint keeps).

    `prior` is p(z) (`priors.py`, `self.prior`): `standard` N(0, I), `mog` a learnable
    mixture of `prior_components` diagonal Gaussians, `vamp` the VampPrior of that many
    pseudo-inputs (None: 10 for mog, 500 for vamp). Every use of p(z) goes through it: the
    KL (closed form when the prior factorises, else a one-sample estimate), the importance
    weights, sampling, traversals and per-dimension KLs. It is the same for every class.

    `CVAE()` with no arguments is the model `python -m cvae.train` builds (its defaults are
    `conf/model/cvae.yaml`'s, the data's channels and size those of the default data,
    Fashion-MNIST at 64x64). Every constructor argument but `optimizer` and `scheduler` is a
    plain value saved in the checkpoint, so `CVAE.load_from_checkpoint(path)` needs no
    config; a checkpoint that lacks a setting whose default changed since it was written
    loads with the value it was trained with (`LEGACY_DEFAULTS`). `optimizer` is a
    factory taking `(params, lr=...)` (default: fused `torch.optim.Adam`); `scheduler` an optional
    factory taking the optimizer, stepped once per epoch.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 64,
        latent_dim: int = 512,
        hidden_channels: Sequence[int] = (16, 32, 64, 128),
        kernel_size: int = 4,
        downsample: str = "stride",
        upsample: str = "resize",
        batch_norm: bool = False,
        residual_blocks: int = 0,
        recon_loss: str = "gaussian_optimal",
        mixture_components: int = 10,
        sigma: float = 2**-0.5,
        min_sigma: float = 0.0025,
        beta: float = 1.0,
        beta_schedule: str = "constant",
        warmup_steps: int = 0,
        free_bits: float = 0.0,
        iw_samples: int = 1,
        max_bad_steps: int = 10,
        skip_updates_above: float | None = None,
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
        check_network(
            in_channels,
            image_size,
            latent_dim,
            hidden_channels,
            kernel_size,
            downsample,
            upsample,
            recon_loss,
            beta,
            lr,
        )
        check_training(
            sigma,
            min_sigma,
            beta_schedule,
            warmup_steps,
            free_bits,
            residual_blocks,
            max_bad_steps,
            iw_samples,
        )
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
        self.likelihood = build_likelihood(recon_loss, sigma, min_sigma, mixture_components)
        self.decoder = Decoder(
            self.likelihood.output_channels(in_channels),
            hidden_channels,
            image_size,
            self._decoder_latents(latent_dim) + label_code,
            kernel_size,
            batch_norm,
            residual_blocks,
            upsample,
            self.likelihood.image_head(in_channels),
        )
        # Built last: a prior's random start leaves the networks' initialisation as it was.
        self.prior = build_prior(
            prior,
            prior_components,
            latent_dim,
            (in_channels, image_size, image_size),
            len(class_names) if conditional else 0,
        )
        if isinstance(self.prior, VampPrior):
            self.prior.bind(self._encode_top)
        if channels_last:  # NHWC: the layout oneDNN and tensor cores convolve fastest
            self.to(memory_format=torch.channels_last)
        self.skipped_steps = 0  # training steps skipped for a non-finite loss or gradients
        if skip_updates_above is not None:
            check_skip_factor(skip_updates_above)
            # the running level of accepted gradient norms and updates seen, saved with the
            # model (so a resumed run goes on with them); only when the option is on, so the
            # state dict of every other model is as it was
            self.register_buffer("grad_norm_level", torch.zeros((), dtype=torch.float64))
            self.register_buffer("grad_norm_updates", torch.zeros((), dtype=torch.long))
            self.register_buffer("skipped_updates", torch.zeros((), dtype=torch.long))
        self.bad_steps_in_a_row = 0
        self._last_loss = torch.tensor(0.0)
        self._epoch_loss, self._epoch_steps = torch.zeros(()), 0  # for train/loss_epoch
        self._rng_states: dict | None = None  # from a checkpoint, set when training resumes

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(
        cls, checkpoint: dict, map_location: torch.device | str | None = None, **overrides: object
    ) -> CVAE:
        """The model a loaded checkpoint dict holds, on `map_location` (None: the CPU), in
        eval mode: of the class it names (`model_class`; `CVAE.from_checkpoint` builds a
        hierarchy's checkpoint as an `HVAE`), its saved settings (a setting it lacks:
        `LEGACY_DEFAULTS`, else today's default) with `overrides` on top, its weights, and
        its hook state."""
        from cvae.models import MODELS  # the registry imports this module

        name = checkpoint.get("model_class", "CVAE")
        if name not in MODELS:
            raise ValueError(
                f"the checkpoint holds a {name} model, which this cvae does not know "
                f"(one of {', '.join(MODELS)})"
            )
        family = MODELS[name] if issubclass(MODELS[name], cls) else cls
        saved = checkpoint["hyper_parameters"]
        legacy = {k: v for k, v in LEGACY_DEFAULTS.items() if k not in saved}
        model = family(**{**legacy, **saved, **overrides})
        model.on_load_checkpoint(checkpoint)
        model.load_state_dict(checkpoint["state_dict"])
        return model.to(map_location or "cpu").eval()

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | os.PathLike,
        map_location: torch.device | str | None = None,
        weights_only: bool = True,
        **overrides: object,
    ) -> CVAE:
        """`from_checkpoint` of the file at `checkpoint_path` (Lightning's loader, but
        old checkpoints keep the settings they were trained with)."""
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=weights_only)
        return cls.from_checkpoint(checkpoint, map_location, **overrides)

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
                raise ValueError(
                    f"{key} given, but this model is not conditional "
                    "(trained with model.conditional=false)"
                )
            return None
        if labels is None:
            names = ", ".join(self.class_names)
            raise ValueError(
                f"{key} is required: this model is conditional on the class "
                f"(model.conditional=true), one of {names}"
            )
        return self.classes.indices(labels, count, key).to(self.device)

    def given(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The labels this model reads of a batch's `labels`: them for a conditional model,
        None otherwise (the one place that decides whether a batch's labels enter)."""
        return labels if self.conditional else None

    def _decoder_latents(self, latent_dim: int) -> int:
        """How many latent values the decoder reads (every level's, side by side)."""
        return latent_dim

    @property
    def latent_levels(self) -> int:
        """How many latent levels the model has (one here)."""
        return 1

    def encoder_input(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """What the encoder reads of images `x` (uint8, or floats in [0, 1]) of class
        `labels`: [0, 1] pixels, with a conditional model's class plane beside them."""
        x = unit_range(x)
        labels = self.class_indices(labels, len(x))
        if labels is not None:
            x = self.conditioning.encoder_input(x, labels)
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def encode(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> Posterior:
        """The posterior q(z | x) of images `x` (uint8, or floats in [0, 1]), of class
        `labels` (a conditional model's class indices, `(B,)`): one latent level here."""
        return Posterior.one_level(*self.encoder(self.encoder_input(x, labels)))

    def _encode_top(self, x: torch.Tensor, labels: torch.Tensor | None) -> Gaussian:
        """The top level of `encode`: what a VampPrior's pseudo-inputs are pushed through."""
        return self.encode(x, labels).top

    def kl_per_dimension(self, posterior: Posterior) -> tuple[torch.Tensor, ...]:
        """KL of each latent dimension to the prior, `(B, D)` per level (`Prior.
        kl_per_dimension`): what active units and the KL histograms read."""
        return (self.prior.kl_per_dimension(posterior.mu, posterior.log_var),)

    def decode(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Images in [0, 1] decoded from latents `z` of shape `(B, latent_dim)`, of class
        `labels` (a conditional model's class indices, `(B,)`)."""
        return self.decoder.images(self.decode_logits(z, labels))

    def decode_logits(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's output before its head, what `self.likelihood` scores, of latents
        `z` and (a conditional model) class `labels`."""
        return self._logits_of_all(z, labels)

    def decode_latents(self, latents: torch.Tensor, labels: object = None) -> torch.Tensor:
        """Images of every level's latents side by side (`Posterior.means`' layout; one
        level: `decode`), of class `labels` (a conditional model's)."""
        return self.decoder.images(self._logits_of_all(latents, labels))

    def _logits_of_all(self, latents: torch.Tensor, labels: object) -> torch.Tensor:
        """The decoder's logits of every level's latents side by side."""
        return self.decoder.logits(
            self._decoder_input(latents, self.class_indices(labels, len(latents)))
        )

    def _decoder_input(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """`z`, or for a conditional model `z` beside the class code of `labels`."""
        if labels is None:
            return z
        return self.conditioning.decoder_input(z, self.conditioning.code(labels))

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Posterior]:
        """Images decoded from one posterior sample, and the posterior."""
        posterior = self.encode(x, labels)
        return self.decode(reparameterize(*posterior.top), labels), posterior

    def exportable(self) -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...], list, list]]:
        """The networks `cvae.export` writes, each with example inputs (a batch of 2, on the
        model's device) and the names of its inputs and outputs: `encoder` (float images in
        [0, 1] -> the top level's `mu`, `log_var`) and `decoder` (top-level latents -> images
        in [0, 1]); a conditional model's networks take the class index as a second input."""
        hp = self.hparams
        images = torch.rand(2, hp.in_channels, hp.image_size, hp.image_size, device=self.device)
        z = torch.randn(2, hp.latent_dim, device=self.device)
        if not self.conditional:
            return {
                "encoder": (self.encoder, (images,), ["images"], ["mu", "log_var"]),
                "decoder": (self.decoder, (z,), ["z"], ["images"]),
            }
        labels = torch.tensor([0, len(self.class_names) - 1], device=self.device)
        encoder = LabelledEncoder(self.encoder, self.conditioning).eval()
        decoder = LabelledDecoder(self.decoder, self.conditioning).eval()
        return {
            "encoder": (encoder, (images, labels), ["images", "labels"], ["mu", "log_var"]),
            "decoder": (decoder, (z, labels), ["z", "labels"], ["images"]),
        }

    def current_beta(self) -> float:
        """The KL weight of this training step under `beta_schedule`."""
        hp = self.hparams
        return beta_at(self.global_step, hp.beta, hp.beta_schedule, hp.warmup_steps)

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
        labels = self.given(labels)
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
            self.log(
                f"{stage}/{name}",
                value,
                on_step=training,
                on_epoch=not training,
                prog_bar=name in ("loss", "mse"),
                batch_size=len(images),
                sync_dist=not training,
            )
        return terms["loss"]

    def _readable_terms(
        self, images: torch.Tensor, labels: torch.Tensor | None, terms: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Curves that move visibly, and scores that mean the same in every run of a sweep:
        squared error per pixel of the decoded posterior means, the negative ELBO at beta = 1
        (`neg_elbo`, nats per image), and it in bits per dimension where the likelihood is
        a density or probability of these images (`Likelihood.bits_per_dim`; continuous
        likelihoods without dequantisation: `cvae.evaluate` gives the bound)."""
        x = unit_range(images)
        mse = (self.reconstruct(x, labels) - x).pow(2).mean()
        neg_elbo = terms["recon"] + terms["kl"]  # at beta = 1: comparable across runs
        readable = {"mse": mse, "neg_elbo": neg_elbo}
        bits = self.likelihood.bits_per_dim(neg_elbo, x[0].numel(), is_binary(images))
        return readable if bits is None else {**readable, "bits_per_dim": bits}

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
                f"{stage}/loss is {loss.item()} at epoch {self.current_epoch + 1}, step "
                f"{self.global_step}: training stopped, the last good checkpoint is kept "
                "(try a lower model.lr or set trainer.gradient_clip_val)"
            )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = capture_rng_states()
        checkpoint["model_class"] = type(self).__name__  # `cvae.models.from_checkpoint` reads it

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
        if not grads:
            return
        # The total norm is finite exactly when every gradient is (one fused pass).
        norm = torch.nn.utils.get_total_norm(grads)
        if not bool(norm.isfinite()):
            optimizer.zero_grad(set_to_none=True)
            loss = float(self._last_loss)
            what = (
                "the gradients are not finite" if math.isfinite(loss) else f"train/loss is {loss}"
            )
            self._skip_bad_step(what)
            return
        self.bad_steps_in_a_row = 0
        if self.hparams.get("skip_updates_above") is not None and self._gradient_spike(norm):
            optimizer.zero_grad(set_to_none=True)

    def _gradient_spike(self, norm: torch.Tensor) -> bool:
        """Whether a finite gradient norm is more than `skip_updates_above` times the running
        level (after the first `SKIP_WARMUP` updates, which set it); an accepted norm moves
        the level. A skipped update is counted and logged."""
        level, seen = self.grad_norm_level, int(self.grad_norm_updates)
        if seen >= SKIP_WARMUP and float(norm) > self.hparams.skip_updates_above * float(level):
            self.skipped_updates += 1
            self.log(
                "train/skipped_updates", float(self.skipped_updates), on_step=True, on_epoch=False
            )
            log.info(
                "skipped the update of step %d: gradient norm %.3g, %.1f times its running level",
                self.global_step,
                float(norm),
                float(norm) / float(level),
            )
            return True
        level.lerp_(norm.to(level), 1.0 if seen == 0 else SKIP_MOMENTUM)
        self.grad_norm_updates += 1
        return False

    def _skip_bad_step(self, what: str) -> None:
        """Count a skipped step; stop after `max_bad_steps` in a row."""
        self.bad_steps_in_a_row += 1
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
        log.warning(
            "skipped training step %d: %s (%d in a row, %d in all)",
            self.global_step,
            what,
            self.bad_steps_in_a_row,
            self.skipped_steps,
        )
        if self.bad_steps_in_a_row >= self.hparams.max_bad_steps:
            raise FloatingPointError(
                f"{what} at epoch {self.current_epoch + 1}, step {self.global_step}: "
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
