"""Summarise a sweep: `python -m cvae.summarize outputs/train/multiruns/<timestamp>`.

Writes summary.csv and summary.md at the sweep root (as the sweep itself does after every
job), e.g. for a sweep that was interrupted: every job it planned is listed, those that never
started as "not run", and a stopped sweep gets the command that continues it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvae.summary import STATUSES, continue_command, write_sweep_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvae.summarize", description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun folder holding one folder per job")
    args = parser.parse_args(argv)
    try:
        rows = write_sweep_summary(args.sweep_dir)
    except (FileNotFoundError, NotADirectoryError) as error:
        sys.exit(f"error: {error}")
    sweep_dir = Path(args.sweep_dir)
    print((sweep_dir / "summary.md").read_text(), end="")
    counts = {status: sum(r["status"] == status for r in rows) for status in STATUSES}
    shown = [f"{n} {status}" for status, n in counts.items() if n or status in STATUSES[:2]]
    print(f"{len(rows)} jobs: {', '.join(shown)}")
    # a stopped sweep (none running: a running job is "incomplete") is continued in its folder
    if (counts["interrupted"] or counts["not run"]) and not counts["incomplete"]:
        print(f"continue with: {continue_command(sweep_dir)}")


if __name__ == "__main__":
    main()
