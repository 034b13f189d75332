"""TensorBoard image logging: what the data looks like and what the model makes of it."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from cvae.viz import interleave_rows, visualize_batch

Batch = tuple[torch.Tensor, torch.Tensor]


def _tensorboard_writers(trainer: pl.Trainer) -> list:
    """SummaryWriters of the trainer's loggers (other loggers have no `add_image`)."""
    return [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_image")]


class ImageLogger(pl.Callback):
    """Logs real training images once, then after each validation epoch a fixed batch of
    validation images beside their reconstructions and samples decoded from fixed noise.

    Fixed inputs make the grids comparable from epoch to epoch.
    """

    def __init__(self, num_images: int = 16, nrow: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.num_images, self.nrow, self.seed = num_images, nrow, seed
        self.val_images: torch.Tensor | None = None

    def _log(
        self, trainer: pl.Trainer, tag: str, images: torch.Tensor, nrow: int | None = None
    ) -> None:
        grid = visualize_batch(images, nrow=nrow or self.nrow)
        for writer in _tensorboard_writers(trainer):
            writer.add_image(tag, grid, global_step=trainer.global_step)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Batch, batch_idx: int
    ) -> None:
        if trainer.global_step == 0 and batch_idx == 0 and trainer.is_global_zero:
            self._log(trainer, "data/train_batch", batch[0][: self.num_images])

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

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.val_images is None:
            return
        inputs = self.val_images
        reconstructions = pl_module.reconstruct(inputs)
        pairs = interleave_rows(inputs, reconstructions, self.nrow)
        self._log(trainer, "val/reconstructions", pairs, min(self.nrow, len(inputs)))
        fixed_noise = torch.Generator().manual_seed(self.seed)
        self._log(trainer, "val/samples", pl_module.sample(self.num_images, generator=fixed_noise))
