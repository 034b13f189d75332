"""What a user sees when something goes wrong: one line they can act on, never a traceback
for bad input, and nothing left on disk by a command that failed before it did anything.

Light on purpose (no torch, no Lightning): every entry point imports it before `--help`.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from hydra.errors import (
    CompactHydraException,
    ConfigCompositionException,
    InstantiationException,
    OverrideParseException,
)
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

T = TypeVar("T")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Set by `run_door` while Hydra composes the config, undone by `composed` when the task starts.
FULL_ERROR, SUGGESTING = "HYDRA_FULL_ERROR", "CVAE_SUGGESTING"
SUGGESTIONS = 3  # close matches named at most
CLOSE_ENOUGH, CLOSE_MARGIN = 0.7, 0.05  # difflib similarity of a match; of others to the best


class CheckpointError(ValueError):
    """A file given as a checkpoint that cvae cannot use: missing, damaged or foreign."""


class Interrupted(Exception):
    """Stopped on a signal (Ctrl-C, SIGTERM) with the work kept: a training run after saving
    `checkpoint`, an evaluation with its finished chunks. The message says how to go on.

    `exit_status` follows the shell's convention for a process ended by a signal (128 + N).
    """

    def __init__(
        self,
        message: str,
        exit_status: int,
        checkpoint: str | None = None,
        requeued: bool = False,
    ) -> None:
        super().__init__(message)
        self.exit_status, self.checkpoint = exit_status, checkpoint
        self.requeued = requeued  # the job comes back by itself: no resume command to give


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
        _record_failure(f"{type(cause).__name__}: {error_line(cause)}")
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


def _record_failure(message: str) -> None:
    """A run folder that kept work (a run that trained, then failed) records how it ended in
    `failure.json`, as a sweep job's does (`summary.SweepSummary`): `make tensorboard` leaves
    failed runs out."""
    from hydra.core.hydra_config import HydraConfig

    from cvae.files import atomic_write

    if not HydraConfig.initialized():
        return
    folder = Path(HydraConfig.get().runtime.output_dir)
    if folder.is_dir():
        with atomic_write(folder / "failure.json", "w") as handle:
            handle.write(json.dumps({"error": message}))


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


def run_door(main: Callable[[], object], config_name: str) -> None:
    """`main()`, a door's `hydra.main` function, with a mistyped key or config option as one
    line naming its close matches (`did you mean trainer.max_epochs?`) instead of Hydra's
    advice to add `+trainer.max_epoch=1`. Hydra prints its composition errors itself and
    exits, unless `HYDRA_FULL_ERROR` is set, when it raises them: so it is set here until
    the task starts (`composed`), and a user's own setting keeps Hydra's full traces."""
    if os.environ.get(FULL_ERROR):
        main()
        return
    os.environ[FULL_ERROR] = os.environ[SUGGESTING] = "1"
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        print(f"error: {override_error(error, config_name)}", file=sys.stderr)
        sys.exit(1)
    except CompactHydraException as error:  # as Hydra itself prints them
        cause = error.__cause__
        print(f"{error}{os.linesep}{cause}" if cause else error, file=sys.stderr)
        sys.exit(1)
    finally:
        composed()


def composed() -> None:
    """The config is composed (the first call of every door's task): from here Hydra reports
    errors its own way again, in this process and in those the task starts."""
    if os.environ.pop(SUGGESTING, None):
        os.environ.pop(FULL_ERROR, None)


def override_error(error: Exception, config_name: str, overrides: list[str] | None = None) -> str:
    """The one line for an override Hydra could not apply (`overrides`: the command line's):
    a key or config option that does not exist, with its close matches among those of the
    composed config; else Hydra's own first line."""
    if overrides is None:
        from hydra._internal.utils import get_args_parser  # the parser hydra.main uses

        args = get_args_parser().parse_known_args()[0]
        overrides, config_name = args.overrides, args.config_name or config_name
    try:
        return bad_override(config_name, overrides) or _first_line(error)
    except Exception:  # the suggestion is a courtesy: never hide Hydra's message behind it
        return _first_line(error)


def bad_override(config_name: str, overrides: list[str]) -> str | None:
    """What is wrong with the first of `overrides` that names a key or config option the
    config `config_name` does not have, with close matches; None when each names one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for line in overrides:
        try:
            parser.parse_overrides([line])
        except OverrideParseException as error:
            return f"{line} is not an override Hydra can read ({_first_line(error)})"
    parsed = parser.parse_overrides(overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        groups = set(compose(config_name, return_hydra_config=True).hydra.runtime.choices)
        chosen, wrong = [], None
        for override in parsed:
            group = override.key_or_group
            if group not in groups or override.is_delete():
                continue
            options = loader.get_group_options(group)
            values = (
                list(override.sweep_string_iterator())
                if override.is_sweep_override()
                else [str(override.value())]
            )
            missing = [value for value in values if value not in options]
            if missing and wrong is None:
                close = _close(missing[0], options, group=group)
                wrong = f"{group}={missing[0]} is not an option of {group}{close} "
                wrong += f"({', '.join(options)})"
            elif not missing:
                chosen.append(f"{override.get_key_element()}={values[0]}")
        if wrong is not None:
            return wrong
        keys = _keys(compose(config_name, overrides=chosen, return_hydra_config=True))
    for override in parsed:
        key = override.key_or_group
        if key in groups or override.package is not None:
            continue
        if override.is_add() and key in keys:
            return f"{override.input_line}: {key} is a key already, set it without '+'"
        if not override.is_add() and not override.is_force_add() and key not in keys:
            shown = keys if key.startswith("hydra.") else {k for k in keys if k[:6] != "hydra."}
            close = _close(key, sorted(shown | groups))
            listing = f"python -m cvae.{_DOORS.get(config_name, config_name)} --cfg job"
            return f"{key} is not a key{close} ({listing} lists them)"
    return None


_DOORS = {"eval": "evaluate"}  # a config's door, where their names differ


def _close(word: str, candidates: list[str], group: str | None = None) -> str:
    """`: did you mean a or b?` for the closest matches of `word` (within `CLOSE_MARGIN` of the
    best), else nothing. A key at the wrong depth (`max_epochs=1`) is matched by its last
    part when the whole matches nothing."""
    scored = _scores(word, candidates)
    if not scored:
        ends: dict[str, str] = {}
        for candidate in candidates:
            ends.setdefault(candidate.rsplit(".", 1)[-1], candidate)
        scored = [(r, ends[e]) for r, e in _scores(word.rsplit(".", 1)[-1], list(ends))]
    if not scored:
        return ""
    best = scored[0][0]
    matches = [c for r, c in scored[:SUGGESTIONS] if r >= best - CLOSE_MARGIN]
    named = [f"{group}={m}" if group else m for m in matches]
    return f": did you mean {' or '.join(named)}?"


def _scores(word: str, candidates: list[str]) -> list[tuple[float, str]]:
    """(similarity, candidate) above `CLOSE_ENOUGH`, the closest first."""
    scored = []
    for candidate in candidates:
        matcher = difflib.SequenceMatcher(None, word, candidate)
        if matcher.ratio() >= CLOSE_ENOUGH:
            scored.append((matcher.ratio(), candidate))
    return sorted(scored, key=lambda rc: (-rc[0], rc[1]))


def _keys(cfg: DictConfig) -> set[str]:
    """Every dotted key of a config (lists are leaves), interpolations left unresolved."""
    found: set[str] = set()

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                found.add(f"{prefix}{key}")
                walk(value, f"{prefix}{key}.")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return found


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(error).__name__
