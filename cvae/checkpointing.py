"""What a checkpoint must get right: written whole or not at all (`AtomicCheckpointIO`),
written when the user interrupts (`SaveOnInterrupt`), and a one-line error for any file that
is not a cvae checkpoint (`read_checkpoint`). The random generators' states it carries are
`cvae.rng`'s."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from cvae.errors import CheckpointError, Interrupted, human_size
from cvae.files import atomic_write, why_unreadable

# What every checkpoint written by `cvae.train` holds (Lightning's keys plus our model's).
REQUIRED_KEYS = ("pytorch-lightning_version", "state_dict", "hyper_parameters")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Serialises the checkpoint in memory, checks that the disk has room for it, then
    writes it through `files.atomic_write` (a temporary file of its own beside the target,
    synced, renamed over it): a run killed mid-save, or two processes saving at once, leave
    the previous `last.ckpt` whole. (Lightning's own save writes to the system temp folder
    and moves from there, which is a copy, so not atomic, when that is another file system.)
    Remote paths keep Lightning's way."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        needed, free = buffer.tell(), shutil.disk_usage(path.parent).free
        if needed > free:
            raise OSError(
                _save_failure(
                    path,
                    f"no space left on the device (it needs "
                    f"{human_size(needed)}, {human_size(free)} free)",
                )
            )
        try:
            with atomic_write(path, sync=True) as handle:
                handle.write(buffer.getbuffer())
        except OSError as error:
            reason = error.strerror or str(error)
            if error.errno == errno.ENOSPC:
                reason = f"no space left on the device (it needs {human_size(needed)})"
            raise OSError(_save_failure(path, reason)) from error


def _save_failure(path: Path, reason: str) -> str:
    """The one line for a checkpoint that could not be written, and what is left there."""
    left = (
        "the previous checkpoint there is intact"
        if path.is_file()
        else "no checkpoint was written there"
    )
    return f"cannot write checkpoint {path}: {reason}; {left}"


class UnfinishedEpoch(Callback):
    """A run stopped mid-epoch by `trainer.max_steps` (or `trainer.should_stop`): Lightning
    counts that epoch as completed in the checkpoints saved after the stop (at the epoch's
    and the training's end), so a resumed run would start the next epoch and never train on
    the batches this one had left. Write the epoch as unfinished instead, as a checkpoint
    saved mid-epoch is: the resumed run goes on with the same epoch's remaining batches, as
    the uninterrupted run does. `training.build` adds it to every run."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        loop = trainer.fit_loop
        done = loop.epoch_loop.batch_progress.current.completed
        epochs = loop.epoch_progress.current
        if not 0 < done < trainer.num_training_batches or epochs.processed < epochs.started:
            return  # a whole epoch, or one still running (Lightning resumes those exactly)
        progress = checkpoint["loops"]["fit_loop"]["epoch_progress"]
        for counts in (progress["total"], progress["current"]):
            counts["processed"] = counts["started"] - 1
            counts["completed"] = min(counts["completed"], counts["processed"])
        checkpoint["epoch"] = progress["current"]["completed"]


def read_checkpoint(path: str | os.PathLike, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at `path` (loaded on the CPU, `weights_only`), or a one-line
    `CheckpointError` naming `key` and what is wrong with the file."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{key}={path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{key}={path} is not a cvae checkpoint (it is a folder)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = why_unreadable(path, error)
        raise CheckpointError(f"{key}={path} is not a cvae checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in REQUIRED_KEYS):
        raise CheckpointError(
            f"{key}={path} is not a cvae checkpoint (a torch file, but not one written by "
            "cvae.train: no model and training state in it)"
        )
    return checkpoint


def requeue_signal() -> int | None:
    """The signal a submitit job gets before its time limit: SIGUSR2, or the one
    `SUBMITIT_PREEMPT_SIGNAL` names (as submitit reads it)."""
    name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    return getattr(signal, f"SIG{name}", None)


class SaveOnInterrupt(Callback):
    """Ctrl-C (SIGINT) or SIGTERM (what schedulers send before a kill or on preemption)
    during training: finish the current step, write `last.ckpt` (exactly resumable, like a
    step checkpoint), then stop with `Interrupted`. A second Ctrl-C quits at once.

    In a job of Hydra's submitit launcher, SLURM sends SIGUSR2 `signal_delay_s` before the
    time limit (and on preemption, where the cluster says so), and submitit's handler for it
    requeues the job at once, mid-step. This callback takes that signal over too, saves the
    step first, then hands the signal to submitit's handler (requeue, or the reason why not);
    the requeued job resumes from that `last.ckpt` (`training.build`).

    Under data-parallel training every rank learns of the signal at the same step (one
    small all-reduce per step), so all of them save and stop together.

    During the test that follows training, Ctrl-C or SIGTERM finishes the current batch and
    stops with `Interrupted` too (there is nothing to save): `training.train` says what
    finished and how to test. A KeyboardInterrupt there would end in Lightning's exit
    status 1 and no word of what is left.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None
        self.testing = False
        self._previous: dict[int, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        requeue = requeue_signal()
        # submitit's requeue signal only where a handler waits for it (a submitit job)
        waited = requeue and requeue not in self.SIGNALS and callable(signal.getsignal(requeue))
        self._install((requeue,) if waited else ())

    def _install(self, handed_on: tuple[int, ...] = ()) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self.received = None
        for signum in (*self.SIGNALS, *handed_on):
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:  # ignored on purpose (nohup, a shell's `&`): leave it
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        # Only a second Ctrl-C quits at once (after SIGTERM the first one is just recorded).
        hint = " (Ctrl-C again quits at once)" if signum == signal.SIGINT else ""
        if signum not in self.SIGNALS:
            hint = " (time limit or preemption), then requeueing the job"
        if self.testing:
            rank_zero_info(f"\n{what}: stopping the test after this batch{hint}")
        else:
            rank_zero_info(f"\n{what}: saving last.ckpt after this step{hint}")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self._received(trainer):
            where = f"epoch {trainer.current_epoch + 1}, step {trainer.global_step}"
            self._save_and_stop(trainer, f"training stopped at {where}")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._received(trainer):  # during the last validation: after the last step's check
            skipped = "what follows it (test, sampler fit) did not run"
            self._save_and_stop(
                trainer, f"training finished (step {trainer.global_step}); {skipped}"
            )
        self._restore()

    def _received(self, trainer: pl.Trainer) -> bool:
        received = self.received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        return received

    def _save_and_stop(self, trainer: pl.Trainer, what_happened: str) -> None:
        signum = self.received or signal.SIGTERM  # a rank told by another rank
        self.received = None
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # the whole state, to resume
        handler = self._previous.get(signum)
        self._restore()
        what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        message = f"{what}: {what_happened}; saved {path}"
        if signum not in self.SIGNALS and callable(handler):
            rank_zero_info(f"{message}; handing {what} to submitit to requeue the job")
            try:  # submitit: requeues and exits on rank 0, returns on the others
                handler(signum, None)
            except Exception as error:  # "Job not requeued because: timed-out too many times."
                message += f"; {str(error).rstrip('.')}"
            else:  # a rank > 0: rank 0 requeues the job, which resumes from the save
                message += f"; rank {trainer.global_rank} stops, rank 0 requeues the job"
                raise Interrupted(message, 128 + signum, str(path), requeued=True)
        raise Interrupted(message, 128 + signum, str(path))

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.testing = True
        self._install()

    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        if self._received(trainer):
            signum = self.received or signal.SIGTERM  # a rank told by another rank
            self._restore()
            what = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            raise Interrupted(f"{what}: the test stopped", 128 + signum)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous, self.testing = {}, False
