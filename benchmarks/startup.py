"""Start-up time of cvae's commands: how long a user waits for `--help` or a sweep table.

Each command runs in a fresh process, `--repeats` times; the median wall time is printed
beside bare Python's (`python -c pass`, the baseline, measured in the same run) and the
target of 2 s. Run: `make bench-startup` (= `.venv/bin/python benchmarks/startup.py`).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 2.0
COMMANDS = {
    "python -c pass (baseline)": ["-c", "pass"],
    "python -c 'import cvae'": ["-c", "import cvae"],
    "python -m cvae.summarize --help": ["-m", "cvae.summarize", "--help"],
    "python -m cvae.summarize DIR": ["-m", "cvae.summarize", "{sweep}"],
    "python -m cvae.train --help": ["-m", "cvae.train", "--help"],
    "python -m cvae.evaluate --help": ["-m", "cvae.evaluate", "--help"],
    "python -m cvae.generate --help": ["-m", "cvae.generate", "--help"],
    "python -m cvae.export --help": ["-m", "cvae.export", "--help"],
}


def seconds(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; Python {platform.python_version()}"
    )
    with tempfile.TemporaryDirectory() as sweep:  # a sweep of one finished job
        (Path(sweep) / "0" / ".hydra").mkdir(parents=True)
        (Path(sweep) / "0" / ".hydra" / "overrides.yaml").write_text("- model.beta=1\n")
        result = '{"final": {"val/loss": 1.5}, "best_val_loss": 1.4, "epochs": 1, "steps": 10}'
        (Path(sweep) / "0" / "result.json").write_text(result)
        rows = {}
        for name, args in COMMANDS.items():
            args = [a.format(sweep=sweep) for a in args]
            seconds(args)  # warm the file cache: the first run after an install is slower
            rows[name] = statistics.median(seconds(args) for _ in range(options.repeats))
    baseline = rows["python -c pass (baseline)"]
    print(f"{'command':<36} {'median s':>9} {'vs baseline':>12}  target < {TARGET_SECONDS:.0f} s")
    for name, value in rows.items():
        verdict = "ok" if value < TARGET_SECONDS else "SLOW"
        print(f"{name:<36} {value:>9.2f} {value / baseline:>11.1f}x  {verdict}")


if __name__ == "__main__":
    main()
