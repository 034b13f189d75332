"""One table and one picture per sweep: every job's objective, rate and distortion, best first.

Each training run leaves `result.json` in its folder; a job that raised leaves `failure.json`
(written by the `SweepSummary` Hydra callback), and every job that ended leaves `job.json`
(its overrides and how it ended: what lets the same sweep command continue a stopped sweep).
`write_sweep_summary(sweep_dir)` turns them into `summary.csv`, `summary.md` and
`rate_distortion.png` at the sweep root, with a row for each job the sweep planned
(`multirun.yaml`) but did not run. The callback checks the objective before the first job,
refreshes the summary after every job and ends the sweep with one line; a sweep stopped by a
signal gets its summary and line from `stopped_sweep`, and `python -m cvae.summarize DIR`
rebuilds the summary at any time.

Rows are sorted by the sweep objective (`objective.metric`, the same meaning in every job),
not by `val/loss`, whose beta differs from job to job. Rate is the KL (nats per image),
distortion the reconstruction term -log p(x | z) (Alemi et al. 2018, "Fixing a Broken ELBO");
a hierarchy's rate is split by level too (`rate_per_level`, top first).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from cvae.errors import error_line, in_multirun, user_error
from cvae.objective import check_objective, rank_key

log = logging.getLogger(__name__)

COLUMNS = (
    "job",
    "status",
    "objective",
    "rate_kl",
    "rate_per_level",
    "distortion_recon",
    "mse_per_pixel",
    "neg_elbo",
    "bits_per_dim",
    "active_units",
    "beta",
    "latent_dim",
    "overrides",
    "best_val_loss",
    "epochs",
    "steps",
    "wall_seconds",
    "checkpoint",
    "error",
)
# Columns taken from a completed job's final validation metrics.
FINAL = {
    "rate_kl": "val/kl",
    "distortion_recon": "val/recon",
    "mse_per_pixel": "val/mse",
    "neg_elbo": "val/neg_elbo",
    "bits_per_dim": "val/bits_per_dim",
    "active_units": "val/active_units",
}
RESULT, FAILURE, PICTURE = "result.json", "failure.json", "rate_distortion.png"
JOB = "job.json"  # {"status", "overrides", "error"}: how the job ended, written when it does
DEFAULT_OBJECTIVE = {"metric": ["val/neg_elbo"], "direction": ["minimize"]}
# exit statuses of a job stopped by a signal (SIGUSR2: a SLURM time limit, not requeued)
STOPPED = {130: "Ctrl-C", 140: "SIGUSR2", 143: "SIGTERM"}
# How a job stands; "incomplete": started, no record of an end (running, or killed).
STATUSES = ("completed", "failed", "interrupted", "incomplete", "not run")


def _job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=_job_order)


def _job_order(job: Path | str) -> tuple[int, str]:
    name = Path(job).name
    return (len(name), name)  # 0, 1, ..., 10


def planned_jobs(sweep_dir: Path) -> dict[str, list[str] | None]:
    """The jobs the sweep in `sweep_dir` set out to run, by folder name, from the
    `multirun.yaml` its sweeper saved: a grid's overrides of each job (expanded as Hydra's
    basic sweeper does), or, for a sweeper that picks its trials as it goes (Optuna),
    `None` for each of its `n_trials`. Empty when the file is missing or names another
    layout (a `hydra.sweep.subdir` other than the job number)."""
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        return {}
    try:
        hydra_cfg = OmegaConf.load(path).hydra
        if OmegaConf.to_container(hydra_cfg.sweep, resolve=False).get("subdir") != (
            "${hydra.job.num}"
        ):
            return {}
        sweeper = hydra_cfg.sweeper
        if str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
            from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
            from hydra.core.override_parser.overrides_parser import OverridesParser

            params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
            typed = [str(o) for o in hydra_cfg.overrides.task]
            parsed = OverridesParser.create().parse_overrides([*params, *typed])
            batches = BasicSweeper.split_arguments(parsed, sweeper.get("max_batch_size"))
            return {str(i): job for i, job in enumerate(j for b in batches for j in b)}
        if sweeper.get("n_trials") is not None:
            return {str(i): None for i in range(int(sweeper.n_trials))}
    except Exception as error:  # a file this code cannot expand: list the folders only
        log.warning("%s: cannot list the planned jobs (%s)", path, error_line(error))
    return {}


def _overrides(job: Path) -> list[str]:
    return yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []


def _record(job: Path) -> dict[str, Any]:
    """The job's `job.json`, or {} (a sweep from before it, a job still running or killed)."""
    try:
        return json.loads((job / JOB).read_text())
    except (OSError, ValueError):
        return {}


def _write_record(job: Path, status: str, overrides: list[str], error: str | None) -> None:
    record = {"status": status, "overrides": overrides, "error": error}
    partial = job / f".{JOB}.{os.getpid()}.partial"
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(job / JOB)


def _model_settings(job: Path) -> dict[str, Any]:
    """The job's beta and latent size, from the config Hydra saved (the point's label)."""
    path = job / ".hydra" / "config.yaml"
    model = (yaml.safe_load(path.read_text()) or {}).get("model", {}) if path.is_file() else {}
    return {"beta": model.get("beta"), "latent_dim": model.get("latent_dim")}


def _row(job: Path, shared: set[str]) -> dict[str, Any]:
    """A job's results; its overrides without those every job of the sweep shares."""
    overrides = [o for o in _overrides(job) if o not in shared]
    row: dict[str, Any] = {
        "job": job.name,
        "overrides": " ".join(overrides),
        **_model_settings(job),
    }
    record = _record(job)
    if record.get("status") == "interrupted":  # stopped by a signal; no result yet
        row.update(status="interrupted", error=record.get("error"))
    elif (job / RESULT).is_file():
        result = json.loads((job / RESULT).read_text())
        final = result.get("final", {})
        objective = result.get("objective", DEFAULT_OBJECTIVE)
        row.update(
            {column: final.get(key) for column, key in FINAL.items()},
            rate_per_level=_rate_per_level(final),
            status="completed",
            objective=final.get(objective["metric"][0]),
            objective_metric=objective["metric"][0],
            objective_direction=objective["direction"][0],
            best_val_loss=result.get("best_val_loss"),
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


def _rate_per_level(final: dict[str, float]) -> str | None:
    """A hierarchy's KL of each latent level, top first (`val/kl_level_<i>`), as
    "12.3 / 4.5"; None for a model of one level."""
    levels = sorted(
        (key for key in final if key.startswith("val/kl_level_")),
        key=lambda key: int(key.rsplit("_", 1)[1]),
    )
    return " / ".join(f"{final[key]:.1f}" for key in levels) or None


def _not_run(name: str, overrides: list[str] | None, shared: set[str]) -> dict[str, Any]:
    """A planned job that never started: its overrides (a trial's are picked when it runs)."""
    shown = " ".join(o for o in overrides if o not in shared) if overrides is not None else ""
    return {"job": name, "status": "not run", "overrides": shown}


def _sort_key(row: dict[str, Any]) -> tuple[int, float, int, tuple[int, str]]:
    value = row.get("objective") if row["status"] == "completed" else None
    ranked = rank_key(value, row.get("objective_direction", "minimize"))
    return (*ranked, row["status"] == "not run", _job_order(row["job"]))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # nats per image need their decimals to rank by eye
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def write_sweep_summary(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Write `summary.csv`, `summary.md` and `rate_distortion.png` for the jobs under
    `sweep_dir`, sorted by the sweep objective (failed and unfinished jobs last); return the
    rows. The overrides column shows what differs between jobs."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise NotADirectoryError(f"{sweep_dir} is not a sweep folder")
    jobs = _job_dirs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"{sweep_dir} holds no job folders (<job>/.hydra/overrides.yaml)")
    started = {job.name for job in jobs}
    waiting = {k: v for k, v in planned_jobs(sweep_dir).items() if k not in started}
    listed = [set(_overrides(job)) for job in jobs]
    listed += [set(v) for v in waiting.values() if v is not None]
    shared = set.intersection(*listed) if len(listed) > 1 else set()
    rows = [_row(job, shared) for job in jobs]
    rows += [_not_run(name, overrides, shared) for name, overrides in waiting.items()]
    rows.sort(key=_sort_key)
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in COLUMNS} for row in rows)
    metrics = {row["objective_metric"] for row in rows if "objective_metric" in row}
    ranked = f"Sorted by {', '.join(sorted(metrics))} (the sweep objective)." if metrics else ""
    lines = [ranked, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(key)) for key in COLUMNS) + " |" for row in rows]
    if draw_rate_distortion(rows, sweep_dir / PICTURE):
        lines += ["", f"![rate and distortion of each job]({PICTURE})"]
    (sweep_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return rows


def draw_rate_distortion(rows: list[dict[str, Any]], path: Path) -> int:
    """The rate-distortion plane of the completed jobs: rate (KL) across, distortion
    (-log p(x | z)) up, each job a point labelled with its beta and latent size. Returns the
    number of points; 0 (and no file) while no job has both numbers."""
    points = [
        r for r in rows if r.get("rate_kl") is not None and r.get("distortion_recon") is not None
    ]
    if not points:
        return 0
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    best = points[0]  # rows come sorted by the objective
    for row in points:
        x, y = row["rate_kl"], row["distortion_recon"]
        axes.scatter([x], [y], color="tab:red" if row is best else "tab:blue", zorder=3)
    # rate + distortion is the negative ELBO at beta = 1: points on one diagonal tie on it
    rates = [r["rate_kl"] for r in points]
    total = best["rate_kl"] + best["distortion_recon"]
    span = [min(rates), max(rates)]
    axes.plot(span, [total - r for r in span], "--", color="tab:red", alpha=0.4, zorder=1)
    axes.margins(x=0.3, y=0.1)  # room for the labels, right of their points
    axes.set_xlabel("rate: KL(q(z|x) || p(z)), nats per image")
    axes.set_ylabel("distortion: -log p(x|z), nats per image")
    metric = best.get("objective_metric", "")
    axes.set_title(
        f"{len(points)} of {len(rows)} jobs; red: best by {metric}\ndashed: rate + "
        f"distortion = {total:.1f}, its negative ELBO",
        fontsize=9,
    )
    axes.grid(alpha=0.3)
    figure.tight_layout()
    labels = [
        f"job {r['job']}: beta {_cell(r.get('beta'))}, latent {_cell(r.get('latent_dim'))}"
        for r in points
    ]
    place_labels(figure, axes, [(r["rate_kl"], r["distortion_recon"]) for r in points], labels)
    partial = path.with_suffix(".partial.png")
    figure.savefig(partial)
    plt.close(figure)
    partial.replace(path)
    return len(points)


# Where a label may go, around its point, in points: nearest first, then further out.
_DIRECTIONS = ((1, 0.5), (1, -0.5), (-1, 0.5), (-1, -0.5), (0, 1), (0, -1), (1, 0), (-1, 0))
_RADII = (6, 16, 28, 42, 60)


def place_labels(
    figure: Any, axes: Any, points: list[tuple[float, float]], labels: list[str]
) -> list[tuple[float, float, float, float]]:
    """Each label beside its point, in the first place around it (nearest first) where it
    covers no other label or point and stays inside the axes; a thin line leads back to a
    label that had to move away. Where no place is free (a crowd of points), the one that
    overlaps least. Nearby jobs of a sweep often differ only in their last digits. Returns
    each label's box, in pixels (x0, y0, x1, y1)."""
    renderer = figure.canvas.get_renderer()
    frame = axes.get_window_extent(renderer)
    # around each point a square no other point's label enters: a label beside a point then
    # belongs to it (the marker's radius is about 4 points)
    keep = 10 * figure.dpi / 72
    centres = [axes.transData.transform(point) for point in points]
    dots = [(cx - keep, cy - keep, cx + keep, cy + keep) for cx, cy in centres]
    placed_boxes: list[tuple[float, float, float, float]] = []

    def overlap(box: tuple[float, float, float, float], own: int) -> float:
        others = [d for i, d in enumerate(dots) if i != own] + placed_boxes
        covered = sum(
            max(0.0, min(box[2], t[2]) - max(box[0], t[0]))
            * max(0.0, min(box[3], t[3]) - max(box[1], t[1]))
            for t in others
        )
        inside = (
            box[0] >= frame.x0 and box[1] >= frame.y0 and box[2] <= frame.x1 and box[3] <= frame.y1
        )
        return covered + (0.0 if inside else 1e9)

    places = [(radius, *direction) for radius in _RADII for direction in _DIRECTIONS]
    pixels = figure.dpi / 72  # per point
    for own, (point, label) in enumerate(zip(points, labels, strict=True)):
        probe = axes.text(0, 0, label, fontsize=8)  # its size, once: the same everywhere
        size = probe.get_window_extent(renderer)
        probe.remove()
        width, height = size.width, size.height
        tried = []
        for radius, ux, uy in places:
            x = centres[own][0] + ux * radius * pixels - width * (ux < 0) - width / 2 * (ux == 0)
            y = centres[own][1] + uy * radius * pixels - height * (uy < 0) - height / 2 * (uy == 0)
            box = (x, y, x + width, y + height)
            tried.append((overlap(box, own), (radius, ux, uy), box))
            if tried[-1][0] == 0:
                break
        _, (radius, ux, uy), box = min(tried, key=lambda entry: entry[0])  # first of the least
        axes.annotate(
            label,
            point,
            textcoords="offset points",
            xytext=(ux * radius, uy * radius),
            ha="left" if ux > 0 else "right" if ux < 0 else "center",
            va="bottom" if uy > 0 else "top" if uy < 0 else "center",
            fontsize=8,
            arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6}
            if radius > _RADII[0]
            else None,
        )
        placed_boxes.append(box)
    return placed_boxes


def sweep_line(sweep_dir: Path, rows: list[dict[str, Any]], stop: str | None = None) -> str:
    """The one line a sweep ends with: what finished, what failed (the first failure's
    error), what did not (a sweep stopped by `stop`, "SIGTERM" or "Ctrl-C", or a job that
    ended without a result) and the command that continues it."""
    names = {s: [r["job"] for r in rows if r["status"] == s] for s in STATUSES}
    names = {s: sorted(jobs, key=_job_order) for s, jobs in names.items()}
    counts = [f"{len(names['completed'])} completed"]
    for status in STATUSES[1:]:
        jobs = names[status]
        if not jobs:
            continue
        if status == "failed":
            first = next(r for r in rows if r["job"] == jobs[0])
            more = f"; also job{'s' * (len(jobs) > 2)} {', '.join(jobs[1:])}" if jobs[1:] else ""
            counts.append(f"{len(jobs)} failed (job {jobs[0]}: {first.get('error')}{more})")
        else:
            shown = ", ".join(jobs[:5]) + (", ..." if len(jobs) > 5 else "")
            counts.append(f"{len(jobs)} {status} (job{'s' * (len(jobs) > 1)} {shown})")
    line = f"{', '.join(counts)}; see {sweep_dir / 'summary.md'}"
    if _unfinished(rows):
        line += f"; continue with: {continue_command(sweep_dir)}"
    if stop is not None:
        return f"sweep stopped by {stop}: {line}"
    return f"sweep {'ended' if _unfinished(rows) else 'finished'}: {line}"


def _unfinished(rows: list[dict[str, Any]]) -> bool:
    """Whether a job of the sweep neither completed nor failed (stopped, killed, not run)."""
    return any(row["status"] in STATUSES[2:] for row in rows)


def continue_command(sweep_dir: Path) -> str:
    """The sweep's own command line (from its `multirun.yaml`) into the same folder: the jobs
    it finished are kept (`kept_result`), an interrupted one resumes from its `last.ckpt`,
    the rest run."""
    hydra_cfg = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
    typed = hydra_cfg.overrides
    skip = ("hydra.sweep.dir=", "hydra.mode=")
    words = [o for o in typed.hydra if not str(o).startswith(skip)] + list(typed.task)
    python = os.path.relpath(sys.executable)
    return " ".join(
        shlex.quote(str(word))
        for word in [
            python if not python.startswith("..") else sys.executable,
            "-m",
            f"cvae.{hydra_cfg.job.name}",
            "-m",
            *words,
            f"hydra.sweep.dir={sweep_dir}",
        ]
    )


def kept_result(cfg: DictConfig) -> dict[str, float] | None:
    """In a sweep started again into its own folder (`continue_command`): the final metrics
    of this job if an earlier start finished it with the same overrides, so it is not run
    (and its folder not touched) again; None otherwise."""
    if not in_multirun():
        return None
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    job = Path(hydra_cfg.runtime.output_dir)
    record = _record(job)
    same = record.get("overrides") == list(hydra_cfg.overrides.task)
    if record.get("status") != "completed" or not same or not (job / RESULT).is_file():
        return None
    log.info("job %s: finished by an earlier start of this sweep (%s): kept", job.name, RESULT)
    return json.loads((job / RESULT).read_text()).get("final", {})


@contextmanager
def stopped_sweep(cfg: DictConfig) -> Iterator[None]:
    """Around a sweep job: when a signal stops it (the job has said so and exits 130 or
    143), record the job as interrupted, write the summary with it and the jobs not run,
    and end with `sweep_line`, before the process exits with that status."""
    try:
        yield
    except SystemExit as stop:
        if stop.code not in STOPPED or not in_multirun():
            raise
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        job, sweep_dir = Path(hydra_cfg.runtime.output_dir), Path(hydra_cfg.sweep.dir)
        signal_name = STOPPED[int(stop.code)]
        if job.is_dir():  # else the job had written nothing, and its folder is gone
            last = job / "checkpoints" / "last.ckpt"
            kept = f"; {last} kept" if last.is_file() else "; nothing saved"
            error = f"stopped by {signal_name}{kept}"
            _write_record(job, "interrupted", list(hydra_cfg.overrides.task), error)
        try:
            rows = write_sweep_summary(sweep_dir)
        except (OSError, ValueError) as error:  # the stop line above still says how to resume
            print(f"error: sweep summary not written: {error_line(error)}", file=sys.stderr)
            raise stop from None
        print(sweep_line(sweep_dir, rows, signal_name), file=sys.stderr)
        raise


def _sweeper_stops_at_failures(config: DictConfig) -> bool:
    """Hydra's basic sweeper re-raises a failed job's error once its batch has run: a
    traceback instead of the sweep's last line, and no `on_multirun_end`."""
    return str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper")


def _study_ends_without_result(config: DictConfig, rows: list[dict[str, Any]]) -> bool:
    """Whether this job is the last trial of an in-memory, single-objective Optuna study run
    here that no trial completed: the sweeper would then end in a traceback asking for the
    best trial, before `on_multirun_end`."""
    sweeper, launcher = config.hydra.sweeper, config.hydra.launcher
    if "optuna" not in str(sweeper.get("_target_", "")) or sweeper.get("storage") is not None:
        return False
    directions = sweeper.get("direction")
    single = isinstance(directions, str) or len(directions) == 1
    last = int(config.hydra.job.num) == int(sweeper.n_trials) - 1
    here = str(launcher.get("_target_", "")).endswith("BasicLauncher")  # this process
    return single and last and here and all(row["status"] != "completed" for row in rows)


class SweepSummary(Callback):
    """Hydra callback: checks the sweep objective before the first job, records how each
    job ended and refreshes the sweep's summary, and ends the sweep with one line (exit
    status 1 when a job failed or did not finish)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.get("objective") is None:  # not a training sweep
            return
        try:
            check_objective(config)
        except ValueError as error:  # one line, and no sweep folder: nothing has run yet
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)
        if "submitit" in str(config.hydra.launcher.get("_target_", "")):
            from cvae.cluster import record_jobs_without_result  # imports submitit

            record_jobs_without_result(_sweeper_stops_at_failures(config))

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode is None or str(config.hydra.mode) != "RunMode.MULTIRUN":
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        overrides = list(config.hydra.overrides.task)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            cause = user_error(error) or error  # what went wrong, not Hydra's wrapper
            message = f"{type(cause).__name__}: {error_line(cause)}"
            (job_dir / FAILURE).write_text(json.dumps({"error": message}))
            _write_record(job_dir, "failed", overrides, message)
            if _sweeper_stops_at_failures(config):  # recorded: the other jobs go on
                job_return.status, job_return.return_value = JobStatus.COMPLETED, None
        else:
            (job_dir / FAILURE).unlink(missing_ok=True)  # from an earlier start of the sweep
            _write_record(job_dir, "completed", overrides, None)
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_sweep_summary(sweep_dir)
        if _study_ends_without_result(config, rows):
            print(sweep_line(sweep_dir, rows), file=sys.stderr)
            sys.exit(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_sweep_summary(sweep_dir)
        short = any(row["status"] == "failed" for row in rows) or _unfinished(rows)
        print(sweep_line(sweep_dir, rows), file=sys.stderr if short else sys.stdout)
        if short:
            sys.exit(1)
