"""Progress a person can follow, on a terminal or in a log file: images done, time spent and
time left, in one way of writing a time. A terminal gets a rich progress bar; runs without
one (nohup, SLURM, any `> run.log`) get a log line every so often. The lines go through
`logging`, so they reach the console and the run folder's log (Hydra's two handlers).
Training's own lines come from `callbacks.TextProgress`, which writes them with these
helpers. No Lightning here: samplers, metrics and FID report progress too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Mapping

import torch

log = logging.getLogger(__name__)


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


def count_images(batches: Iterable, max_images: int | None = None) -> int | None:
    """How many images `batches` holds (a DataLoader, our device batches or a list), if known."""
    total = None
    for source in (getattr(batches, "dataset", None), getattr(batches, "sampler", None)):
        if source is not None and hasattr(source, "__len__"):
            total = len(source)
            break
    if total is None and isinstance(batches, (list, tuple)):
        total = sum(len(batch[0]) for batch in batches)
    if total is not None and max_images is not None:
        total = min(total, max_images)
    return total


class ProgressReport:
    """Images (or other `unit`s) done, with an ETA: a rich progress bar on a terminal
    (stderr), else a log line at most every `every` seconds (batch jobs, pipes). `done`
    count as finished before this process started (a resumed evaluation): they do not enter
    the rate."""

    def __init__(
        self,
        total: int | None,
        label: str,
        done: int = 0,
        enabled: bool = True,
        every: float = 30.0,
        unit: str = "images",
    ) -> None:
        self.total, self.label, self.done, self.enabled = total, label, done, enabled
        self.unit = unit
        self.started, self.start_done, self.every = time.monotonic(), done, every
        self.last_line = self.started
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich import progress as bars
            from rich.console import Console

            self.bar = bars.Progress(
                bars.TextColumn(f"{label}: {unit}"),
                bars.MofNCompleteColumn(),
                bars.BarColumn(),
                bars.TimeElapsedColumn(),
                bars.TextColumn("ETA"),
                bars.TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=done)

    def advance(self, images: int) -> None:
        self.done += images
        if self.bar is not None:
            self.bar.update(self.task, advance=images)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last_line >= self.every or self.done == self.total):
            self.last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """`<label>: 1,200 of 10,000 images, 2.3 min, about 17.0 min left`."""
        elapsed = now - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        of = f" of {self.total:,}" if self.total else ""
        text = f"{self.label}: {self.done:,}{of} {self.unit}, {duration(elapsed)}"
        if self.total and rate > 0:
            text += f", about {duration((self.total - self.done) / rate)} left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
