"""Training callbacks: what the data looks like, what the model makes of it, its likelihood,
progress lines for runs without a terminal, and the sampler fitted when training ends."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar, Timer

from cvae.errors import Interrupted, stopped_by
from cvae.metrics import (
    CHANNELS,
    PosteriorStatistics,
    channel_errors,
    colour_distance,
    colour_histogram,
    is_colour,
    named,
)
from cvae.objective import LOGGED
from cvae.pixels import dequantize
from cvae.progress import duration, metrics_text
from cvae.samplers import LatentSampler, fit_and_save, fit_command
from cvae.viz import interleave_rows, visualize_batch

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]
MAX_CLASS_ROWS = 10  # a conditional model's val/samples: a row for each of its first classes
# What a progress line shows of the latest metrics, when logged.
SHOWN = ("train/loss", "train/loss_epoch", "val/loss", "val/neg_elbo", "val/mse", "val/iw_nll")
WHEN = ("auto", "always", "never")


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
        reconstructions = pl_module.reconstruct(inputs, pl_module.given(self.val_labels))
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
    """When training ends, fit `sampler` (`conf/sampler/`, built once by Hydra) to the run's
    final `checkpoint` (last.ckpt) on every training image, save it beside it, record the fit
    in `folder/sampler.json` and show 64 of its samples in TensorBoard, `samples/<name>`: at
    `on_fit_end`, before the loggers close, so they land in the run's one events file. Rank
    0 only; a run stopped by an error or an interrupt fits nothing, and the prior has nothing
    to fit. A fit that fails (a class with a single image) is a warning that gives the
    command, not a failed run. Ctrl-C or SIGTERM during the fit stops the run with
    `Interrupted`, whose line says that training finished and gives the fit command (a
    KeyboardInterrupt would end in Lightning's exit status 1 and no word of what is left)."""

    def __init__(
        self, sampler: LatentSampler, checkpoint: str | Path, folder: str | Path, seed: int = 0
    ) -> None:
        super().__init__()
        self.sampler, self.checkpoint, self.folder = sampler, Path(checkpoint), Path(folder)
        self.seed = seed

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.sampler.needs_fit or not trainer.is_global_zero:
            return
        if not self.checkpoint.is_file():
            return
        try:
            self._fit(trainer, pl_module)
        except KeyboardInterrupt as stop:
            what, status = stopped_by(stop)
            name = self.sampler.name
            raise Interrupted(
                f"{what}: training finished (step {trainer.global_step}; saved "
                f"{self.checkpoint}), but sampler={name} was not fitted to it: fit it with: "
                f"{fit_command(self.checkpoint, name)}",
                status,
            ) from None

    def _fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = self.sampler.name
        checkpoint = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        model = type(pl_module).from_checkpoint(checkpoint, pl_module.device)
        batches = trainer.datamodule.ordered_dataloader("train")
        try:
            fit_and_save(self.sampler, model, batches, self.checkpoint, self.folder)
        except ValueError as error:  # e.g. a class with one image: the run itself succeeded
            log.warning(
                "sampler=%s was not fitted (%s); the checkpoints are kept, fit it with: %s",
                name,
                error,
                fit_command(self.checkpoint, name),
            )
            return
        generator = torch.Generator().manual_seed(self.seed)
        labels = torch.arange(64) % len(model.class_names) if model.conditional else None
        images = model.sample(64, generator=generator, labels=labels, sampler=self.sampler)
        log_grid(trainer, f"samples/{name}", images)


class LatentMonitor(pl.Callback):
    """How much of the latent space the model uses, per validation epoch: `val/active_units`
    and a histogram of each dimension's KL (`val/kl_per_dim`). Also fills TensorBoard's
    hparams tab: the run's model and data settings with its latest `hp/val_*` metrics (those
    a sweep objective can name), so the runs of a sweep can be compared there. Active units
    count every validation image; the KL histogram the first `kl_images` (None: all)."""

    def __init__(self, kl_images: int | None = 200) -> None:
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
            posterior = pl_module.encode(batch[0], pl_module.given(batch[1]))
            self.statistics.update(posterior, pl_module.kl_per_dimension)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.statistics.count == 0:
            return
        if trainer.world_size > 1:
            self.statistics.sum_over_ranks(lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        pl_module.log("val/active_units", float(self.statistics.active_units()))
        levels = self.statistics.active_units_per_level()
        for level, active in enumerate(levels if len(levels) > 1 else []):
            pl_module.log(f"val/active_units_level_{level}", float(active))
        if not trainer.is_global_zero:
            return
        kl = self.statistics.kl_per_dim().float().cpu()
        for writer in _tensorboard_writers(trainer):
            writer.add_histogram("val/kl_per_dim", kl, global_step=trainer.global_step)
        self._update_hparams(trainer, pl_module)

    def _update_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics  # the metrics a sweep objective can name
        values = {
            f"hp/{key.replace('/', '_')}": float(metrics[key])
            for key in (*LOGGED, "val/iw_nll")
            if key in metrics
        }
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
            x = dequantize(images, pl_module.likelihood.continuous, generator)
            total += -pl_module.log_likelihood(
                x, pl_module.given(labels), k=self.iw_samples, generator=generator
            ).sum()
        pl_module.log("val/iw_nll", total / self.collected, sync_dist=True)


class ColourMonitor(pl.Callback):
    """How well a model of colour images (three channels) reproduces colour, after each
    validation epoch, from the first `num_images` validation images, their reconstructions
    and as many samples from the prior (fixed noise): each channel's mean absolute error
    (`colour/mae_<channel>`), how far the reconstructions' and samples' intensities lie
    from the real images' (`colour/w1_reconstructions_<channel>`, `colour/w1_samples_...`:
    `metrics.colour_distance`) and the three channels' histograms drawn over each other
    (`colour/histograms`). Rank 0, TensorBoard only; other images are left alone."""

    def __init__(self, num_images: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.num_images, self.seed = num_images, seed
        self.batches: list[Batch] = []
        self.collected = 0

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: Batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or self.collected >= self.num_images or not is_colour(batch[0]):
            return  # the same images every epoch: those of the first validation
        images, labels = (part[: self.num_images - self.collected] for part in batch)
        self.batches.append((images.detach().clone(), labels.detach().clone()))
        self.collected += len(images)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.batches:
            return
        images = torch.cat([b[0] for b in self.batches])
        labels = pl_module.given(torch.cat([b[1] for b in self.batches]))
        with torch.no_grad():
            reconstructions = torch.cat(
                [
                    pl_module.reconstruct(
                        images[i : i + 64], None if labels is None else labels[i : i + 64]
                    )
                    for i in range(0, len(images), 64)
                ]
            )
            generator = torch.Generator().manual_seed(self.seed)
            samples = pl_module.sample(len(images), generator=generator, labels=labels)
        real = colour_histogram(images)
        shown = {"reconstructions": colour_histogram(reconstructions)}
        shown["samples"] = colour_histogram(samples)  # the prior's (the fitted sampler: at the end)
        values = {
            f"mae_{c}": v for c, v in named(channel_errors(reconstructions, images).mean(0)).items()
        }
        for what, histogram in shown.items():
            values |= {
                f"w1_{what}_{c}": v for c, v in named(colour_distance(real, histogram)).items()
            }
        step = trainer.global_step
        for writer in _tensorboard_writers(trainer):
            for name, value in values.items():
                writer.add_scalar(f"colour/{name}", value, global_step=step)
            writer.add_figure("colour/histograms", histogram_figure(real, shown), global_step=step)


def histogram_figure(real: torch.Tensor, others: dict[str, torch.Tensor]) -> object:
    """A panel per channel: the real images' intensity histogram and `others`' over it (a
    matplotlib `Figure` of its own: no pyplot state, whatever backend a notebook uses)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 2.8))
    axes = figure.subplots(1, len(CHANNELS), sharey=True)
    centres = (torch.arange(real.shape[1]) + 0.5) / real.shape[1]
    curves = {"real": real, **others}
    for c, (axis, name) in enumerate(zip(axes, CHANNELS, strict=True)):
        for (label, histogram), style in zip(curves.items(), ("-", "--", ":"), strict=False):
            axis.plot(centres, histogram[c] / histogram[c].sum(), style, color=name, label=label)
        axis.set_title(name)
        axis.set_xlabel("intensity")
    axes[0].set_ylabel("share of pixels")
    axes[-1].legend(fontsize="small")
    figure.tight_layout()
    return figure


class ProgressBar(RichProgressBar):
    """Lightning's rich bar with the epochs numbered from 1, as the log lines, the interrupt
    line and the resume line number them (`Epoch 1/50`, where Lightning's says `Epoch 0/49`),
    and off where stdout is not a terminal (a log file), where rich would write its last
    frame into the log: `TextProgress` writes lines there. `when`: `auto`, `always` or
    `never`; the trainer's `enable_progress_bar` stays on, else Lightning adds a bar of its
    own."""

    def __init__(self, when: str = "auto", **settings: object) -> None:
        if when not in WHEN:
            raise ValueError(
                f"callbacks.rich_progress_bar.when={when!r} is not one of {', '.join(WHEN)}"
            )
        super().__init__(**settings)
        if when == "never" or (when == "auto" and not sys.stdout.isatty()):
            self.disable()

    def _get_train_description(self, current_epoch: int) -> str:
        """The text before the training bar (Lightning's hook for it, which it pads to the
        validation bar's text so the two do not flicker)."""
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch + 1}" + (f"/{epochs}" if epochs and epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}"


class TextProgress(pl.Callback):
    """What a run will cost and how far it is. Before the first step, its expected length
    (`plan_line`: the steps, and `trainer.max_time` if set) and, once the first steps are
    timed, the time they take (`timed_line`): in every run, so a user knows before a long
    wait. Then a line at least every `every_minutes` and at each epoch end: epoch, step,
    images/s, elapsed and time left (the first of `max_epochs`, `max_steps` and `max_time`
    to end the run), the latest train and val metrics. `when`: `auto` (those lines only when
    stdout is not a terminal, where the rich bar shows progress), `always` or `never` (no
    line at all, the expected length included)."""

    TIMED_STEPS = 10  # steps timed for the expected time (the first, warming up, is not)
    TIMED_SECONDS = 60.0  # or fewer steps, once this long has been timed

    def __init__(self, every_minutes: float = 2.0, when: str = "auto") -> None:
        super().__init__()
        if when not in WHEN:
            raise ValueError(
                f"callbacks.text_progress.when={when!r} is not one of {', '.join(WHEN)}"
            )
        if not every_minutes > 0:
            raise ValueError(
                f"callbacks.text_progress.every_minutes must be > 0, got {every_minutes!r}"
            )
        self.every = every_minutes * 60
        self.enabled = when == "always" or (when == "auto" and not sys.stdout.isatty())
        self.planned = when != "never"
        self.started = self.last_line = 0.0
        self.first_step = 0
        self.images = 0
        self.timed_steps, self.timed_seconds = 0, 0.0
        self.previous_end: float | None = None  # the last step's end, within one epoch
        self.timed = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = self.last_line = time.monotonic()
        self.first_step, self.images = trainer.global_step, 0  # a resumed run: from here
        if self.planned and trainer.is_global_zero:
            log.info("%s", plan_line(trainer))

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.previous_end = None  # a step interval spanning validation is not timed

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
    ) -> None:
        self.images += len(batch[0]) * trainer.world_size
        now = time.monotonic()
        self._time_step(trainer, now)
        if self.enabled and now - self.last_line >= self.every:
            self._line(trainer, "")

    def _time_step(self, trainer: pl.Trainer, now: float) -> None:
        """Time steps (not validation) until there are enough, then say the expected time."""
        if self.timed or not self.planned:
            return
        if self.previous_end is not None:
            self.timed_steps += 1
            self.timed_seconds += now - self.previous_end
        self.previous_end = now
        enough = self.timed_steps >= self.TIMED_STEPS or (
            self.timed_steps and self.timed_seconds >= self.TIMED_SECONDS
        )
        if enough:
            self.timed = True
            if trainer.is_global_zero:
                per_step = self.timed_seconds / self.timed_steps
                log.info("%s", timed_line(trainer, per_step, self.first_step))

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
        if math.isfinite(total):
            text += f"/{int(total):,}"
        text += f", {self.images / elapsed:.0f} images/s" if elapsed > 0 else ""
        text += f", {duration(elapsed)} elapsed"
        left, limit = time_left(trainer, elapsed / steps if steps > 0 else None)
        if left is not None:
            text += f", about {duration(left)} left{' (trainer.max_time)' if limit else ''}"
        shown = metrics_text(trainer.callback_metrics, SHOWN)
        log.info("%s%s", text, f"; {shown}" if shown else "")


def time_limit(trainer: pl.Trainer) -> float | None:
    """Seconds of training `trainer.max_time` leaves (Lightning's `Timer`, which counts a
    resumed run's earlier training too); None without a limit."""
    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            return callback.time_remaining()
    return None


def time_left(trainer: pl.Trainer, per_step: float | None) -> tuple[float | None, bool]:
    """Seconds until the run ends at `per_step` seconds a step, and whether
    `trainer.max_time` ends it (before `max_epochs` or `max_steps`, which
    `estimated_stepping_batches` weighs); None when neither is known yet."""
    total, limit = trainer.estimated_stepping_batches, time_limit(trainer)
    by_steps = None
    if per_step is not None and math.isfinite(total):
        by_steps = max(total - trainer.global_step, 0) * per_step
    if limit is not None and (by_steps is None or limit < by_steps):
        return max(limit, 0.0), True
    return by_steps, False


def plan_line(trainer: pl.Trainer) -> str:
    """`expected length: 42,200 steps (50 epochs x 844 steps, trainer.max_epochs=50)`, with
    what is left of a resumed run and the `trainer.max_time` limit."""
    max_epochs, max_steps = trainer.max_epochs or -1, trainer.max_steps
    per_epoch = trainer.num_training_batches / trainer.accumulate_grad_batches
    per_epoch = math.ceil(per_epoch) if math.isfinite(per_epoch) else None
    by_epochs = max_epochs * per_epoch if max_epochs > 0 and per_epoch is not None else None
    if max_steps != -1 and (by_epochs is None or max_steps < by_epochs):
        text = f"{max_steps:,} steps (trainer.max_steps={max_steps}"
        if by_epochs is not None:
            text += f"; {_epochs(max_epochs)} of {per_epoch:,} steps would be {by_epochs:,}"
        text += ")"
    elif by_epochs is not None:
        text = (
            f"{by_epochs:,} steps ({_epochs(max_epochs)} x {per_epoch:,} steps, "
            f"trainer.max_epochs={max_epochs})"
        )
    else:
        text = "no step limit"
    total = trainer.estimated_stepping_batches
    if trainer.global_step > 0 and math.isfinite(total):
        left = max(int(total) - trainer.global_step, 0)
        text += f", {left:,} left from step {trainer.global_step:,}"
    limit = time_limit(trainer)
    if limit is not None:
        text += f"; trainer.max_time stops it after {duration(max(limit, 0.0))} if that is sooner"
    return f"expected length: {text}; the time follows once the first steps are timed"


def timed_line(trainer: pl.Trainer, per_step: float, first_step: int = 0) -> str:
    """`timed: 0.43 s per step: the 42,200 steps take about 5.0 h` (a resumed run: those
    from `first_step`), or when `trainer.max_time` stops the run first, and near which step."""
    total = trainer.estimated_stepping_batches
    rate = f"{per_step:.2g} s" if per_step < 10 else duration(per_step)
    text = f"timed: {rate} per step"
    seconds, limited = time_left(trainer, per_step)
    if limited and seconds is not None:
        near = trainer.global_step + int(seconds / per_step)
        of = f" of {int(total):,}" if math.isfinite(total) else ""
        text += f": trainer.max_time stops it in {duration(seconds)}, near step {near:,}{of}"
    elif math.isfinite(total):
        steps = max(int(total) - first_step, 0)
        start = f" from step {first_step:,}" if first_step > 0 else ""
        text += f": the {steps:,} steps{start} take about {duration(steps * per_step)}"
    return f"{text} (validation and what follows training come on top)"


def _epochs(count: int) -> str:
    return f"{count} epoch{'s' if count != 1 else ''}"
