"""Progress a person can follow from a log file: runs without a terminal (nohup, SLURM, any
`> run.log`) get a line every few minutes and at every epoch end, where a terminal gets the
rich progress bar. The lines go through `logging`, so they reach the console and the run
folder's `<task>.log` (Hydra's two handlers)."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

import lightning.pytorch as pl
import torch

log = logging.getLogger(__name__)
# What a training line shows of the latest metrics, when logged.
SHOWN = ("train/loss", "train/loss_epoch", "val/loss", "val/neg_elbo", "val/mse", "val/iw_nll")
WHEN = ("auto", "always", "never")


def duration(seconds: float) -> str:
    """`45 s`, `12.5 min`, `3.2 h`: a time a person reads at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def metrics_text(metrics: Mapping[str, torch.Tensor | float], names: tuple[str, ...]) -> str:
    """`train/loss 123.4, val/loss 120.1` of the `names` present in `metrics`."""
    return ", ".join(f"{name} {float(metrics[name]):.4g}" for name in names if name in metrics)


class TextProgress(pl.Callback):
    """A log line at least every `every_minutes` and at each epoch end: epoch, step,
    images/s, elapsed and time left, the latest train and val metrics. `when`: `auto` (only
    when stdout is not a terminal), `always` or `never`."""

    def __init__(self, every_minutes: float = 2.0, when: str = "auto") -> None:
        super().__init__()
        if when not in WHEN:
            raise ValueError(f"callbacks.text_progress.when={when!r} is not one of "
                             f"{', '.join(WHEN)}")  # fmt: skip
        if not every_minutes > 0:
            raise ValueError(
                f"callbacks.text_progress.every_minutes must be > 0, got {every_minutes!r}"
            )
        self.every = every_minutes * 60
        self.enabled = when == "always" or (when == "auto" and not sys.stdout.isatty())
        self.started = self.last_line = 0.0
        self.first_step = 0
        self.images = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.last_line = time.monotonic()
        self.first_step, self.images = trainer.global_step, 0  # a resumed run: from here

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
    ) -> None:
        self.images += len(batch[0]) * trainer.world_size
        if self.enabled and time.monotonic() - self.last_line >= self.every:
            self._line(trainer, "")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after validation, so the line carries this epoch's val metrics
        if self.enabled:
            self._line(trainer, "epoch end: ")

    def _line(self, trainer: pl.Trainer, what: str) -> None:
        now = time.monotonic()
        self.last_line = now
        if not trainer.is_global_zero:
            return
        elapsed, steps = now - self.started, trainer.global_step - self.first_step
        total = trainer.estimated_stepping_batches
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        text = f"{what}epoch {trainer.current_epoch + 1}{epochs}, step {trainer.global_step:,}"
        if total and total != float("inf"):
            text += f"/{int(total):,}"
        text += f", {self.images / elapsed:.0f} images/s" if elapsed > 0 else ""
        text += f", {duration(elapsed)} elapsed"
        if steps > 0 and total and total != float("inf"):
            left = (total - trainer.global_step) * elapsed / steps
            text += f", about {duration(left)} left"
        shown = metrics_text(trainer.callback_metrics, SHOWN)
        log.info("%s%s", text, f"; {shown}" if shown else "")
