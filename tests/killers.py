"""Callbacks that kill the training process the hard way, for the resume tests (and one that
lets a sweep notice such a job at once)."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

from hydra.experimental.callback import Callback as HydraCallback
from lightning.pytorch import Callback


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handlers: a real kill -9


class KillAt(Callback):
    """SIGKILL as training step `step` (counted from 0) is about to start."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            _kill()


class KillDuringSave(Callback):
    """SIGKILL halfway through writing the checkpoint saved after step `step` to disk (into
    the temporary file `files.atomic_write` opened for it)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step != self.step:  # checkpoint callbacks run after this one
            return
        from cvae import checkpointing

        real = checkpointing.atomic_write

        @contextmanager
        def half_then_die(path, *args, **kwargs):
            with real(path, *args, **kwargs) as handle:
                write = handle.write

                def write_half(data):
                    write(bytes(data)[: len(data) // 2])
                    handle.flush()
                    _kill()

                handle.write = write_half
                yield handle

        checkpointing.atomic_write = half_then_die


class SignalAt(Callback):
    """Send this process `signum` (SIGINT as Ctrl-C does, or SIGTERM) as training step
    `step` (counted from 0) is about to start."""

    def __init__(self, step: int, signum: int = signal.SIGINT) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class SignalAtValidation(Callback):
    """Send this process `signum` as the validation after training step `step` (counted
    from 1) ends: after that step's own check for a signal."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum = step, signum

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)


class SignalInSamplerFit(Callback):
    """Send this process `signum` as the sampler fitted when training ends (`SamplerFit`)
    starts its fit, after the training images are encoded."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def on_fit_start(self, trainer, pl_module) -> None:
        from cvae.callbacks import SamplerFit

        (callback,) = [c for c in trainer.callbacks if isinstance(c, SamplerFit)]
        fit = callback.sampler.fit

        def signalled(*args, **kwargs):
            os.kill(os.getpid(), self.signum)
            return fit(*args, **kwargs)

        callback.sampler.fit = signalled


class SignalAtTest(Callback):
    """Send this process `signum` as the first batch of the test after training starts."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx: int, *args) -> None:
        if batch_idx == 0:
            os.kill(os.getpid(), self.signum)


class FailAt(Callback):
    """A `ValueError` (an input error: one line, exit status 1) after training step `step`,
    with the run's work so far (event files) kept."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs) -> None:
        if trainer.global_step >= self.step:
            raise ValueError(f"failed on purpose at step {trainer.global_step}")


class NoWaitForMissingResults(HydraCallback):
    """A Hydra callback for a sweep through the submitit launcher on a local disk: submitit
    waits 15 s for the result file of each job that ended without one (time for a network
    file system to show it); here the file is written or never will be, so look once."""

    def on_multirun_start(self, config, **kwargs) -> None:
        from submitit.core.core import Job

        Job._results_timeout_s = 0
