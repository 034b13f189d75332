"""Training callbacks: what the data looks like, what the model makes of it, and its likelihood."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch

from cvae.metrics import PosteriorStatistics, likelihood_input
from cvae.objective import LOGGED
from cvae.samplers import fit_command
from cvae.viz import interleave_rows, visualize_batch

if TYPE_CHECKING:
    from cvae.samplers import LatentSampler

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]
MAX_CLASS_ROWS = 10  # a conditional model's val/samples: a row for each of its first classes


def _tensorboard_writers(trainer: pl.Trainer) -> list:
    """SummaryWriters of the trainer's loggers (other loggers have no `add_image`)."""
    return [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_image")]


def log_grid(trainer: pl.Trainer, tag: str, images: torch.Tensor, nrow: int = 8) -> None:
    """`images` as one grid in the trainer's TensorBoard logs, at its current step."""
    grid = visualize_batch(images, nrow=nrow)
    for writer in _tensorboard_writers(trainer):
        writer.add_image(tag, grid, global_step=trainer.global_step)


class ImageLogger(pl.Callback):
    """Logs real training images once per run (a resumed run too), then after each
    validation epoch a fixed batch of validation images beside their reconstructions and
    samples decoded from fixed noise (a conditional model: a row per class, up to
    `MAX_CLASS_ROWS`, the same noise in every row).

    Fixed inputs make the grids comparable from epoch to epoch.
    """

    def __init__(self, num_images: int = 16, nrow: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_images, self.nrow, self.seed = num_images, nrow, seed
        self.val_images: torch.Tensor | None = None
        self.train_batch_logged = False
        self.val_labels: torch.Tensor | None = None

    def _log(
        self, trainer: pl.Trainer, tag: str, images: torch.Tensor, nrow: int | None = None
    ) -> None:
        log_grid(trainer, tag, images, nrow or self.nrow)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Batch, batch_idx: int
    ) -> None:
        if not self.train_batch_logged and trainer.is_global_zero:  # a resumed run too
            self._log(trainer, "data/train_batch", batch[0][: self.num_images])
            self.train_batch_logged = True

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.val_images is None and batch_idx == 0:
            self.val_images = batch[0][: self.num_images].detach().clone()
            self.val_labels = batch[1][: self.num_images].detach().clone()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.val_images is None:
            return
        inputs, conditional = self.val_images, pl_module.conditional
        reconstructions = pl_module.reconstruct(inputs, self.val_labels if conditional else None)
        pairs = interleave_rows(inputs, reconstructions, self.nrow)
        self._log(trainer, "val/reconstructions", pairs, min(self.nrow, len(inputs)))
        fixed_noise = torch.Generator().manual_seed(self.seed)
        if conditional:
            classes = range(min(MAX_CLASS_ROWS, len(pl_module.class_names)))
            samples = pl_module.sample_classes(self.nrow, classes, generator=fixed_noise)
        else:
            samples = pl_module.sample(self.num_images, generator=fixed_noise)
        self._log(trainer, "val/samples", samples)


class SamplerFit(pl.Callback):
    """`cvae.train sampler=gmm|two_stage`: when training ends, fit the sampler to the run's
    final `checkpoint` (last.ckpt) and show 64 of its samples in TensorBoard,
    `samples/<sampler>`: at `on_fit_end`, before the loggers close, so they land in the
    run's one events file. Rank 0 only; a run stopped by an error or an interrupt fits
    nothing. `fit(model, datamodule, checkpoint)` fits and saves (`runtime.fit_sampler`,
    bound to the config and the run folder); one that fails (a class with a single image)
    is a warning that gives the command, not a failed run."""

    def __init__(
        self,
        name: str,
        fit: Callable[..., tuple[LatentSampler, Path]],
        checkpoint: Path,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.name, self.fit, self.checkpoint, self.seed = name, fit, Path(checkpoint), seed

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not self.checkpoint.is_file():
            return
        model = (
            type(pl_module)
            .load_from_checkpoint(self.checkpoint, map_location=pl_module.device, weights_only=True)
            .eval()
        )
        try:
            sampler, _ = self.fit(model, trainer.datamodule, self.checkpoint)
        except ValueError as error:  # e.g. a class with one image: the run itself succeeded
            command = fit_command(self.checkpoint, self.name)
            log.warning("sampler=%s was not fitted (%s); the checkpoints are kept, fit it "
                        "with: %s", self.name, error, command)  # fmt: skip
            return
        generator = torch.Generator().manual_seed(self.seed)
        labels = torch.arange(64) % len(model.class_names) if model.conditional else None
        images = model.sample(64, generator=generator, labels=labels, sampler=sampler)
        log_grid(trainer, f"samples/{self.name}", images)


class LatentMonitor(pl.Callback):
    """How much of the latent space the model uses, per validation epoch: `val/active_units`
    and a histogram of each dimension's KL (`val/kl_per_dim`). Also fills TensorBoard's
    hparams tab: the run's model and data settings with its latest `hp/val_*` metrics (those
    a sweep objective can name), so the runs of a sweep can be compared there. Active units
    count every validation image; the KL histogram the first `kl_images` (None: all)."""

    def __init__(self, kl_images: int | None = 2000) -> None:
        super().__init__()
        self.kl_images = kl_images
        self.statistics = PosteriorStatistics(kl_images)
        self.hparams_written = False

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.statistics = PosteriorStatistics(self.kl_images)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        with torch.no_grad():
            labels = batch[1] if pl_module.conditional else None
            self.statistics.update(*pl_module.encode(batch[0], labels), pl_module.prior)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.statistics.count == 0:
            return
        if trainer.world_size > 1:
            self.statistics.sum_over_ranks(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        pl_module.log("val/active_units", float(self.statistics.active_units()))
        if not trainer.is_global_zero:
            return
        kl = self.statistics.kl_per_dim().float().cpu()
        for writer in _tensorboard_writers(trainer):
            writer.add_histogram("val/kl_per_dim", kl, global_step=trainer.global_step)
        self._update_hparams(trainer, pl_module)

    def _update_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics  # the metrics a sweep objective can name
        values = {f"hp/{key.replace('/', '_')}": float(metrics[key])
                  for key in (*LOGGED, "val/iw_nll") if key in metrics}  # fmt: skip
        values["hp/val_active_units"] = float(self.statistics.active_units())
        for logger in trainer.loggers:
            if not hasattr(logger.experiment, "add_scalar"):
                continue
            if not self.hparams_written:  # the hparams summary, naming the metrics, once
                params = {f"model/{k}": v for k, v in pl_module.hparams.items()}
                if trainer.datamodule is not None:
                    params |= {f"data/{k}": v for k, v in trainer.datamodule.hparams.items()}
                logger.log_hyperparams(params, metrics=values)
            for key, value in values.items():
                logger.experiment.add_scalar(key, value, global_step=trainer.global_step)
        self.hparams_written = True


class LikelihoodMonitor(pl.Callback):
    """`val/iw_nll`: the importance-weighted NLL bound (nats per image, `iw_samples` samples)
    of the first `num_images` validation images every `every_n_epochs` epochs (0: never), so
    a likelihood run's curve is the number it is judged by, not the looser ELBO. The same
    images and random numbers every time: epochs differ only by the model."""

    def __init__(
        self, every_n_epochs: int = 0, num_images: int = 2000, iw_samples: int = 100, seed: int = 0
    ) -> None:
        super().__init__()
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.iw_samples, self.seed = iw_samples, seed
        self.batches: list[Batch] = []
        self.collected = 0
        self.complete = False  # the images are collected in the first validation epoch

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or self.every_n_epochs <= 0 or self.complete:
            return
        if self.collected < self.num_images:
            images, labels = (part[: self.num_images - self.collected] for part in batch)
            self.batches.append((images.detach().clone(), labels.detach().clone()))
            self.collected += len(images)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = self.every_n_epochs > 0 and (
            (trainer.current_epoch + 1) % self.every_n_epochs == 0
            or trainer.current_epoch + 1 == trainer.max_epochs
        )
        if trainer.sanity_checking:
            return
        self.complete = True
        if not due or not self.batches:
            return
        generator = torch.Generator().manual_seed(self.seed)
        total = torch.zeros((), device=pl_module.device)
        for images, labels in self.batches:
            x = likelihood_input(images, pl_module.likelihood.continuous, generator)
            labels = labels if pl_module.conditional else None
            total += -pl_module.log_likelihood(x, labels, k=self.iw_samples,
                                               generator=generator).sum()  # fmt: skip
        pl_module.log("val/iw_nll", total / self.collected, sync_dist=True)
