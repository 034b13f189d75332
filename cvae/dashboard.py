"""TensorBoard on one run or sweep: `python -m cvae.dashboard [FOLDER] [--port N]`.

`make tensorboard RUN=FOLDER` runs it. FOLDER is a run folder, a sweep folder, or a folder
holding runs and sweeps (default `outputs`: its newest run or sweep, by its newest event
file). A sweep's jobs that failed (their `failure.json`) are left out, and said; each run is
named by its folder, a sweep job by its number and overrides. The printed address opens on
the loss curves (TensorBoard's own opens on whatever it lists first, the training images).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from cvae.summary import FAILURE, RESULT

EVENTS = "tensorboard/events.out.tfevents.*"  # where a run's logger writes (conf/logger/)
LOSS_CURVES = "#scalars&tagFilter=loss"  # TensorBoard's scalars, filtered to the losses


def has_events(run: Path) -> bool:
    return any(run.glob(EVENTS))


def failed(run: Path) -> bool:
    """Whether the run ended with an error (`failure.json`, which a sweep job and a single
    run that kept work both leave) after any result it recorded (`result.json`)."""
    failure, result = run / FAILURE, run / RESULT
    if not failure.is_file():
        return False
    return not result.is_file() or failure.stat().st_mtime >= result.stat().st_mtime


def runs_of(folder: Path) -> list[Path]:
    """The runs `folder` is: itself (a run folder), or its jobs (a sweep folder)."""
    if has_events(folder):
        return [folder]
    jobs = [p for p in folder.iterdir() if p.is_dir() and has_events(p)]
    return sorted(jobs, key=lambda p: (len(p.name), p.name))  # 0, 1, ..., 10


def newest_events(folder: Path) -> float:
    return max((p.stat().st_mtime for p in folder.glob(f"**/{EVENTS}")), default=0.0)


def newest(log_dir: Path) -> Path:
    """The run or sweep under `log_dir` (`<task>/runs/*`, `<task>/multiruns/*`) with the
    newest event file, a run that failed passed over."""
    found = [
        folder
        for folder in (*log_dir.glob("*/runs/*"), *log_dir.glob("*/multiruns/*"))
        if folder.is_dir() and any(not failed(run) for run in runs_of(folder))
    ]
    if not found:
        raise FileNotFoundError(f"no run with TensorBoard event files under {log_dir}: train first")
    return max(found, key=newest_events)


def chosen(folder: Path) -> Path:
    """`folder` if it is a run or a sweep, else its newest run or sweep."""
    if not folder.is_dir():
        raise FileNotFoundError(f"RUN={folder} is not a folder")
    return folder if runs_of(folder) else newest(folder)


def run_name(run: Path, sweep: bool) -> str:
    """A run's name in TensorBoard: its folder, or a sweep job's number and overrides (no
    commas or colons, which separate `--logdir_spec`'s entries)."""
    name = run.name
    overrides = run / ".hydra" / "overrides.yaml"
    if sweep and overrides.is_file():
        typed = yaml.safe_load(overrides.read_text()) or []
        name = " ".join([name, *typed])
    return name.replace(",", ";").replace(":", "-")


def serve(folder: Path) -> tuple[Path, list[Path], list[Path]]:
    """The run or sweep to show, its runs shown and those left out (failed)."""
    folder = chosen(folder)
    runs = runs_of(folder)
    return folder, [r for r in runs if not failed(r)], [r for r in runs if failed(r)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvae.dashboard", description=__doc__)
    parser.add_argument("folder", nargs="?", default="outputs", help="a run or sweep folder")
    parser.add_argument("--port", type=int, default=6006)
    parser.add_argument("--dry-run", action="store_true", help="print the command, start nothing")
    args = parser.parse_args(argv)
    try:
        folder, shown, left_out = serve(Path(args.folder))
    except FileNotFoundError as error:
        sys.exit(f"error: {error}")
    if not shown:
        sys.exit(f"error: every run of {folder} failed: nothing to show")
    sweep = shown != [folder]
    spec = ",".join(f"{run_name(run, sweep)}:{run / 'tensorboard'}" for run in shown)
    command = [sys.executable, "-m", "tensorboard.main", "--logdir_spec", spec]
    command += ["--port", str(args.port)]
    runs = f"{len(shown)} run{'s' if len(shown) != 1 else ''}"
    if left_out:
        runs += f"; failed, left out: {', '.join(run.name for run in left_out)}"
    print(f"TensorBoard on {folder} ({runs}); the loss curves at:")
    print(f"http://localhost:{args.port}/{LOSS_CURVES}", flush=True)
    if args.dry_run:
        print(" ".join(command))
        return
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
