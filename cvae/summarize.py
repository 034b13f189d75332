"""Summarise a sweep: `python -m cvae.summarize outputs/train/multiruns/<timestamp>`.

Writes summary.csv and summary.md at the sweep root (as the sweep itself does after every
job), e.g. for a sweep that was interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cvae.summary import write_sweep_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cvae.summarize", description=__doc__)
    parser.add_argument("sweep_dir", help="a multirun folder holding one folder per job")
    args = parser.parse_args(argv)
    try:
        rows = write_sweep_summary(args.sweep_dir)
    except (FileNotFoundError, NotADirectoryError) as error:
        sys.exit(f"error: {error}")
    print((Path(args.sweep_dir) / "summary.md").read_text(), end="")
    print(
        f"{len(rows)} jobs: {sum(r['status'] == 'completed' for r in rows)} completed, "
        f"{sum(r['status'] == 'failed' for r in rows)} failed"
    )


if __name__ == "__main__":
    main()
