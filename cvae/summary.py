"""One table per sweep: every job's overrides and results, best first.

Each training run leaves `result.json` in its folder; a job that raised leaves `failure.json`
(written by the `SweepSummary` Hydra callback). `write_sweep_summary(sweep_dir)` turns them into
`summary.csv` and `summary.md` at the sweep root. The callback refreshes them after every
job, so an interrupted sweep has a summary of what finished, and `python -m cvae.summarize
DIR` rebuilds one at any time.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from cvae.errors import error_line, user_error

COLUMNS = ("job", "status", "overrides", "best_val_loss", "val_loss", "val_recon", "val_kl",
           "active_units", "epochs", "steps", "wall_seconds", "checkpoint", "error")  # fmt: skip
RESULT, FAILURE = "result.json", "failure.json"


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda p: (len(p.name), p.name))  # 0, 1, ..., 10


def _overrides(job: Path) -> list[str]:
    return yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []


def _row(job: Path, shared: set[str]) -> dict[str, Any]:
    """A job's results; its overrides without those every job of the sweep shares."""
    overrides = [o for o in _overrides(job) if o not in shared]
    row: dict[str, Any] = {"job": job.name, "overrides": " ".join(overrides)}
    if (job / RESULT).is_file():
        result = json.loads((job / RESULT).read_text())
        final = result.get("final", {})
        row.update(
            status="completed",
            best_val_loss=result.get("best_val_loss"),
            val_loss=final.get("val/loss"),
            val_recon=final.get("val/recon"),
            val_kl=final.get("val/kl"),
            active_units=final.get("val/active_units"),
            epochs=result.get("epochs"),
            steps=result.get("steps"),
            wall_seconds=result.get("wall_seconds"),
            checkpoint=result.get("checkpoint"),
        )
    elif (job / FAILURE).is_file():
        row.update(status="failed", error=json.loads((job / FAILURE).read_text())["error"])
    else:
        row["status"] = "incomplete"  # still running, or killed
    return row


def _sort_key(row: dict[str, Any]) -> tuple[int, float]:
    value = row.get("best_val_loss")
    ok = row["status"] == "completed" and value is not None and math.isfinite(value)
    return (0, value) if ok else (1, math.inf)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def write_sweep_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write `summary.csv` and `summary.md` for the jobs under `sweep_dir`, sorted by the
    best `val/loss` (failed and unfinished jobs last); return the rows. The overrides column
    shows what differs between jobs."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NotADirectoryError(f"{sweep_dir} is not a sweep folder")
    jobs = _job_dirs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (<job>/.hydra/overrides.yaml)")
    shared = set.intersection(*(set(_overrides(job)) for job in jobs)) if len(jobs) > 1 else set()
    rows = sorted((_row(job, shared) for job in jobs), key=_sort_key)
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in COLUMNS} for row in rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in COLUMNS) + " |" for row in rows]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


class SweepSummary(Callback):
    """Hydra callback: records a failed job's error, then refreshes the sweep's summary."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            cause = user_error(error) or error  # what went wrong, not Hydra's wrapper
            message = f"{type(cause).__name__}: {error_line(cause)}"
            (job_dir / FAILURE).write_text(json.dumps({"error": message}))
        write_sweep_summary(config.hydra.sweep.dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_sweep_summary(config.hydra.sweep.dir)
