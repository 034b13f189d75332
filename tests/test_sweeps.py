"""Sweeps rank their jobs by an objective that means the same in every job, draw the
rate-distortion plane, and record failing jobs without stopping the others."""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from cvae.summarize import main as summarize_main
from cvae.summary import draw_rate_distortion
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow  # every test here runs real commands or trainings


def _read(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv") as handle:
        return list(csv.DictReader(handle))


def test_sweep_summary_lists_every_job_best_first(tmp_path: Path) -> None:
    run_cli(
        "model.beta=0.5,2",
        "model.latent_dim=4,8",
        "test=false",
        f"hydra.sweep.dir={tmp_path}",
        multirun=True,
    )
    rows = _read(tmp_path)
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    objective = [float(r["objective"]) for r in rows]  # default: val/neg_elbo
    assert objective == sorted(objective)
    assert objective == [float(r["neg_elbo"]) for r in rows]
    assert {frozenset(r["overrides"].split()) for r in rows} == {
        frozenset({f"model.beta={b}", f"model.latent_dim={d}"})
        for b in ("0.5", "2")
        for d in (4, 8)
    }
    for row in rows:
        assert Path(row["checkpoint"]).is_file() and int(row["epochs"]) == 1
        assert float(row["active_units"]) <= 8 and float(row["wall_seconds"]) > 0
        assert float(row["rate_kl"]) >= 0 and float(row["mse_per_pixel"]) > 0
        assert float(row["bits_per_dim"]) > 0 and row["latent_dim"] in ("4", "8")
        # the negative ELBO at beta = 1 is rate + distortion, whatever the job's beta
        assert abs(
            float(row["neg_elbo"]) - float(row["rate_kl"]) - float(row["distortion_recon"])
        ) < 1e-3 * float(row["neg_elbo"])
    markdown = (tmp_path / "summary.md").read_text().splitlines()
    assert markdown[0] == "Sorted by val/neg_elbo (the sweep objective)."
    assert markdown[2].startswith(
        "| job | status | objective | rate_kl | rate_per_level | distortion_recon"
    )
    assert markdown[-1] == "![rate and distortion of each job](rate_distortion.png)"
    assert (tmp_path / "rate_distortion.png").stat().st_size > 10_000


def test_the_objective_ranks_where_val_loss_would_not(tmp_path: Path) -> None:
    # val/loss = recon + beta * KL favours the small beta by construction; the rate (val/kl)
    # favours the large one: the summary follows the objective.
    run_cli(
        "model.beta=0.01,8",
        "test=false",
        "objective.metric=val/kl",
        f"hydra.sweep.dir={tmp_path}",
        multirun=True,
    )
    rows = _read(tmp_path)
    assert [r["beta"] for r in rows] == ["8", "0.01"]
    assert float(rows[0]["rate_kl"]) < float(rows[1]["rate_kl"])
    assert float(rows[0]["best_val_loss"]) > float(rows[1]["best_val_loss"])
    result = json.loads((tmp_path / "0" / "result.json").read_text())
    assert result["objective"] == {"metric": ["val/kl"], "direction": ["minimize"]}


def test_an_unknown_objective_fails_before_the_first_job(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "model.beta=1,2",
        "objective.metric=val/accuracy",
        f"hydra.sweep.dir={sweep}",
        multirun=True,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(
        "error: objective.metric='val/accuracy' is not logged by this "
        "run: one of val/neg_elbo, val/bits_per_dim"
    )
    assert "val/active_units" in lines[-1] and "val/iw_nll" not in lines[-1]
    assert not sweep.exists()  # nothing ran, nothing was made
    single = run_cli(
        "objective.metric=val/iw_nll", f"hydra.run.dir={tmp_path / 'run'}", check=False
    )
    assert (
        single.returncode == 1
        and "(it needs callbacks.likelihood_monitor.every_n_epochs > 0)" in single.stderr
    )
    assert not (tmp_path / "run").exists()


def test_the_picture_has_a_point_per_completed_job(tmp_path: Path) -> None:
    rows = [
        {
            "job": "1",
            "status": "completed",
            "rate_kl": 3.0,
            "distortion_recon": 40.0,
            "beta": 1,
            "latent_dim": 8,
            "objective_metric": "val/neg_elbo",
        },
        {
            "job": "0",
            "status": "completed",
            "rate_kl": 9.0,
            "distortion_recon": 30.0,
            "beta": 0.5,
            "latent_dim": 8,
            "objective_metric": "val/neg_elbo",
        },
        {"job": "2", "status": "failed"},
        {"job": "3", "status": "incomplete"},
    ]
    assert draw_rate_distortion(rows, tmp_path / "plane.png") == 2
    assert (tmp_path / "plane.png").is_file()
    assert draw_rate_distortion(rows[2:], tmp_path / "none.png") == 0
    assert not (tmp_path / "none.png").exists()


BAD_BETA = "ValueError: model.beta must be a finite number >= 0, got -1"


def test_labels_of_nearby_jobs_do_not_overlap() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from cvae.summary import place_labels

    # three clusters of jobs a hair apart, as a short sweep gives them, one near an edge
    points = [(3.1, 40.2), (3.3, 40.0), (3.2, 40.5), (3.15, 40.3), (9.0, 30.0), (9.3, 30.1)]
    points += [(15.0, 25.0), (15.2, 25.05)]
    labels = [f"job {i}: beta 0.25, latent 128" for i in range(len(points))]
    figure, axes = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    axes.scatter([x for x, _ in points], [y for _, y in points])
    axes.margins(x=0.3, y=0.1)
    figure.tight_layout()
    boxes = place_labels(figure, axes, points, labels)
    frame = axes.get_window_extent(figure.canvas.get_renderer())
    plt.close(figure)
    for i, a in enumerate(boxes):
        assert frame.x0 <= a[0] and a[2] <= frame.x1 and frame.y0 <= a[1] and a[3] <= frame.y1
        for b in boxes[i + 1 :]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


def test_a_failing_job_is_recorded_and_the_others_run(tmp_path: Path) -> None:
    result = run_cli(
        "model.beta=1,-1,2", "test=false", f"hydra.sweep.dir={tmp_path}", multirun=True, check=False
    )
    assert result.returncode == 1  # the sweep reports that a job failed, in one line
    assert "error: model.beta must be a finite number >= 0, got -1" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"sweep finished: 2 completed, 1 failed (job 1: {BAD_BETA}); see {tmp_path}/summary.md"
    )
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr
    rows = {r["job"]: r for r in _read(tmp_path)}
    assert [rows[j]["status"] for j in ("0", "1", "2")] == ["completed", "failed", "completed"]
    assert "ValueError: model.beta must be a finite number >= 0" in rows["1"]["error"]
    assert list(rows) == ["0", "2", "1"] or list(rows) == ["2", "0", "1"]  # failed last
    assert (tmp_path / "rate_distortion.png").is_file()  # what completed is drawn


@pytest.mark.parametrize("search", ["optuna", "optuna_rate_distortion"])
def test_an_optuna_study_records_a_failed_trial_and_goes_on(tmp_path: Path, search: str) -> None:
    # the seeded sampler's first trial draws beta -1 (refused by the model), the others 1
    result = run_cli(
        f"hparams_search={search}",
        "hydra.sweeper.n_trials=3",
        "model.beta=choice(1,-1)",
        "test=false",
        "sampler=prior",
        f"hydra.sweep.dir={tmp_path}",
        check=False,
    )
    rows = {r["job"]: r for r in _read(tmp_path)}
    assert sorted(rows) == ["0", "1", "2"]  # every trial ran
    failed = sorted(job for job, row in rows.items() if row["status"] == "failed")
    assert failed and len(failed) < 3 and all(rows[j]["error"] == BAD_BETA for j in failed)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"sweep finished: {3 - len(failed)} completed, {len(failed)} failed (job {failed[0]}: "
        f"{BAD_BETA}{'; also job ' + failed[1] if failed[1:] else ''}); "
        f"see {tmp_path}/summary.md"
    )
    assert (tmp_path / "optimization_results.yaml").is_file()  # the study's result, as always


def test_an_optuna_study_where_every_trial_fails_ends_in_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        "model.beta=choice(-1)",
        f"hydra.sweep.dir={tmp_path}",
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"sweep finished: 0 completed, 2 failed (job 0: {BAD_BETA}; also job 1); "
        f"see {tmp_path}/summary.md"
    )


def test_a_sweep_stopped_by_sigterm_lists_every_job_and_continues(tmp_path: Path, capsys) -> None:
    sweep = tmp_path / "sweep"
    # 4 steps an epoch: only job 1 (3 epochs) reaches step 5, where the sweep's process is
    # sent SIGTERM, as a scheduler or `kill` sends it, mid-job (tests.killers.SignalAt)
    stop = ["+callbacks.stop._target_=tests.killers.SignalAt", "+callbacks.stop.step=5"]
    args = ["trainer.max_epochs=1,3,1", "test=false", "sampler=prior", *stop]
    result = run_cli(
        *args, "+callbacks.stop.signum=15", f"hydra.sweep.dir={sweep}", multirun=True, check=False
    )
    stderr = result.stderr
    assert result.returncode == 143, stderr[-3000:]
    assert "epoch end: epoch 1/3" in (sweep / "1" / "train.log").read_text()  # stopped mid-job
    last = stderr.strip().splitlines()[-1]
    command = last.split("; continue with: ")[1]
    assert last == (
        "sweep stopped by SIGTERM: 1 completed, 1 interrupted (job 1), 1 not run (job 2); "
        f"see {sweep}/summary.md; continue with: {command}"
    )
    rows = {r["job"]: r for r in _read(sweep)}
    assert [(j, rows[j]["status"]) for j in sorted(rows)] == [
        ("0", "completed"),
        ("1", "interrupted"),
        ("2", "not run"),
    ]
    assert rows["1"]["error"] == f"stopped by SIGTERM; {sweep}/1/checkpoints/last.ckpt kept"
    assert rows["2"]["overrides"] == "trainer.max_epochs=1"  # what differs between jobs
    summarize_main([str(sweep)])  # afterwards, from the files alone: the same
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2:] == [
        "3 jobs: 1 completed, 0 failed, 1 interrupted, 1 not run",
        f"continue with: {command}",
    ]
    assert [r["status"] for r in _read(sweep)] == [rows[j]["status"] for j in ("0", "1", "2")]

    kept = (sweep / "0" / "result.json").read_text()
    done = subprocess.run(
        shlex.split(command),
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        f"sweep finished: 3 completed; see {sweep}/summary.md"
    )
    assert (sweep / "0" / "result.json").read_text() == kept  # job 0 was not run again
    assert "finished by an earlier start of this sweep (result.json): kept" in done.stdout
    assert "resuming from it" in (sweep / "1" / "train.log").read_text()
    rows = {r["job"]: r for r in _read(sweep)}
    assert {r["status"] for r in rows.values()} == {"completed"}
    assert [rows[j]["epochs"] for j in ("0", "1", "2")] == ["1", "3", "1"]


def test_summarize_an_interrupted_sweep(tmp_path: Path, capsys) -> None:
    finals = {"val/loss": 3.5, "val/neg_elbo": 3.6, "val/kl": 0.6, "val/recon": 3.0}
    for job, result in (("0", {"best_val_loss": 3.0, "final": finals}), ("1", None)):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- model.beta={job}\n")
        if result:  # a result.json from before objectives: ranked by val/neg_elbo
            (tmp_path / job / "result.json").write_text(json.dumps(result))
    summarize_main([str(tmp_path)])
    rows = _read(tmp_path)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "completed"), ("1", "incomplete")]
    assert float(rows[0]["objective"]) == 3.6
    assert "2 jobs: 1 completed, 0 failed, 1 incomplete" in capsys.readouterr().out
    assert (tmp_path / "rate_distortion.png").is_file()


def test_the_summary_splits_a_hierarchys_rate_by_level(tmp_path: Path) -> None:
    """A job of a hierarchy logs `val/kl_level_<i>`: its row shows them, top first (level 10
    after level 2); a one-level job's cell is empty."""
    levels = {f"val/kl_level_{i}": float(i) + 0.25 for i in (0, 1, 2, 10)}
    finals = {"val/neg_elbo": 3.6, "val/kl": 13.0, "val/recon": 3.0}
    for job, extra in (("0", levels), ("1", {})):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- model.beta={job}\n")
        result = {"best_val_loss": 3.0, "final": {**finals, **extra}}
        (tmp_path / job / "result.json").write_text(json.dumps(result))
    summarize_main([str(tmp_path)])
    rows = {r["job"]: r for r in _read(tmp_path)}
    assert rows["0"]["rate_per_level"] == "0.2 / 1.2 / 2.2 / 10.2"
    assert rows["1"]["rate_per_level"] == ""
    assert "| rate_per_level |" in (tmp_path / "summary.md").read_text()


def test_hparams_search_beta_latent_runs_its_grid(tmp_path: Path) -> None:
    run_cli("hparams_search=beta_latent", "test=false", f"hydra.sweep.dir={tmp_path}")
    rows = _read(tmp_path)
    # The tiny settings fix model.latent_dim on the command line, which wins over the grid's
    # values for that key: the beta axis is what is left to sweep.
    assert sorted(r["overrides"] for r in rows) == [
        "model.beta=0.5",
        "model.beta=1",
        "model.beta=4",
    ]
    assert all(r["status"] == "completed" for r in rows)
