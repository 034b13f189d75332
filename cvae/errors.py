"""What a user sees when something goes wrong: one line they can act on, never a traceback
for bad input, and nothing left on disk by a command that failed before it did anything.

Light on purpose (no torch, no Lightning): every entry point imports it before `--help`.
"""

from __future__ import annotations

import math
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

T = TypeVar("T")


class CheckpointError(ValueError):
    """A file given as a checkpoint that cvae cannot use: missing, damaged or foreign."""


class Interrupted(Exception):
    """Stopped on a signal (Ctrl-C, SIGTERM) with the work kept: a training run after saving
    `checkpoint`, an evaluation with its finished chunks. The message says how to go on.

    `exit_status` follows the shell's convention for a process ended by a signal (128 + N).
    """

    def __init__(self, message: str, exit_status: int, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.exit_status, self.checkpoint = exit_status, checkpoint


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler or `kill` sends) inside `sigterm_raises`: a KeyboardInterrupt,
    so that whatever keeps its work on Ctrl-C keeps it on SIGTERM too."""


def stopped_by(stop: KeyboardInterrupt) -> tuple[str, int]:
    """What stopped the work, "Ctrl-C" or "SIGTERM", and the exit status a shell gives it."""
    return ("SIGTERM", 128 + signal.SIGTERM) if isinstance(stop, Terminated) else ("Ctrl-C", 130)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises `Terminated` instead of ending the process without a word.
    Only where SIGTERM has its default action, in the main thread: a handler someone else
    set (submitit's, training's `SaveOnInterrupt`) is left alone."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handle(signum: int, frame: object) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Errors that mean "the input (or the machine: disk, permissions) is wrong", reported as one
# line instead of a traceback.
INPUT_ERRORS = (ValueError, OSError, FloatingPointError, MissingMandatoryValue)


def user_error(error: BaseException) -> BaseException | None:
    """The input error behind `error`, if it is one: anything that failed while building an
    object from the config (Hydra wraps it), or one of `INPUT_ERRORS`."""
    if isinstance(error, InstantiationException):
        while error.__cause__ is not None:
            error = error.__cause__
        return error
    return error if isinstance(error, INPUT_ERRORS) else None


def error_line(error: BaseException) -> str:
    """The one line to show for an input error.

    An error raised in a DataLoader worker reaches us as "Caught ... in DataLoader worker
    process N" with the original traceback in the message: its last line is the real error.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "Original Traceback" in str(error) else lines[0]


def human_size(count: float) -> str:
    """Bytes as a person reads them: 512 B, 144 KiB, 17.0 MiB, 2.1 GiB."""
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit != "MiB" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def check_finite(cfg: DictConfig | ListConfig, prefix: str = "") -> None:
    """Reject NaN and infinite numbers anywhere in a config, naming the key: `model.beta=nan`
    would otherwise train until the first validation and die there."""
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else enumerate(cfg)
    for key, _ in items:
        name = f"{prefix}{key}" if isinstance(cfg, DictConfig) else f"{prefix[:-1]}[{key}]"
        try:
            value = cfg[key]
        except Exception:  # unresolved interpolations and ??? are reported where they are used
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            check_finite(value, f"{name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{name}={value} is not a finite number")


def run_or_report(run: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """`run(cfg)`, turning an input error into `error: <one line>` and exit status 1, an
    interrupted run into its one-line message, and Ctrl-C or SIGTERM into one line."""
    try:
        check_finite(cfg)
        with sigterm_raises():
            return run(cfg)
    except KeyboardInterrupt as stop:
        what, status = stopped_by(stop)
        print(f"interrupted ({what})", file=sys.stderr)
        _remove_empty_run_folder(cfg)
        sys.exit(status)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_status)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"error: {error_line(cause)}", file=sys.stderr)
        if in_multirun():  # let Hydra record this job as failed and go on with the others
            raise
        _remove_empty_run_folder(cfg)
        sys.exit(1)


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra `-m` sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _remove_empty_run_folder(cfg: DictConfig | None = None) -> None:
    """A run that failed on bad input (or was interrupted before it wrote anything) leaves no
    husk: remove Hydra's run folder if it holds nothing but what Hydra itself put there
    (`.hydra/` and the job's log), then the parents Hydra made for it that are now empty
    (`outputs/train/runs/`), up to the outputs root `paths.log_dir`, which stays."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = Path(hydra_cfg.runtime.output_dir)
    own = {hydra_cfg.output_subdir, f"{hydra_cfg.job.name}.log"}
    if folder.is_dir() and all(entry.name in own for entry in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
        _remove_empty_parents(folder, _log_dir(cfg))


def _log_dir(cfg: DictConfig | None) -> Path | None:
    """The outputs root of `cfg` (`paths.log_dir`), if it has one that resolves."""
    try:
        log_dir = OmegaConf.select(cfg, "paths.log_dir") if cfg is not None else None
    except Exception:  # an interpolation that does not resolve: keep every parent
        return None
    return Path(log_dir).resolve() if log_dir else None


def _remove_empty_parents(folder: Path, root: Path | None) -> None:
    """Remove the empty folders between `folder` and `root` (both excluded), innermost
    first, stopping at the first that holds anything. Nothing outside `root` is touched."""
    folder = folder.resolve()
    if root is None or root not in folder.parents:
        return
    for parent in folder.parents:
        if parent == root:
            return
        try:
            parent.rmdir()  # only ever succeeds on an empty folder
        except OSError:
            return
