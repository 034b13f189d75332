"""Long runs and scale-out: hard kills then resume, DDP on CPU processes inside a sweep,
the submitit and Optuna plugins."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import yaml

from cvae import CVAE
from cvae.training import train
from tests.helpers import LONG_RUN, compose_train, run_cli

pytestmark = pytest.mark.slow  # every test here runs real commands or trainings


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def test_kill_9_mid_epoch_then_resume_continues_exactly(
    tmp_path: Path, uninterrupted: dict
) -> None:
    whole = uninterrupted
    assert whole["global_step"] == 14

    killed = tmp_path / "killed"
    result = run_cli(
        *LONG_RUN,
        f"hydra.run.dir={killed}",
        "+callbacks.kill.step=11",
        "+callbacks.kill._target_=tests.killers.KillAt",
        check=False,
    )
    assert result.returncode == -9  # SIGKILL: nothing ran after it
    saved = _checkpoint(killed / "checkpoints" / "last.ckpt")
    assert (saved["global_step"], saved["epoch"]) == (10, 1)  # step 3 of the second epoch

    train(
        compose_train(
            tmp_path / "resumed", *LONG_RUN, f"ckpt_path={killed / 'checkpoints' / 'last.ckpt'}"
        )
    )
    resumed = _checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == 14
    # The same remaining batches, in the same order, with the same noise: the same weights.
    for name, value in whole["state_dict"].items():
        assert torch.allclose(value.float(), resumed["state_dict"][name].float(), atol=1e-6), name


def test_a_max_steps_stop_mid_epoch_then_resume_continues_exactly(tmp_path: Path) -> None:
    """7 steps an epoch: a stop at step 10 is 3 steps into the second epoch, and resuming to
    step 17 trains the rest of it and 3 steps of the third, as one run to step 17 does."""
    run = [*LONG_RUN, "trainer.max_epochs=3"]
    train(compose_train(tmp_path / "whole", *run, "trainer.max_steps=17"))
    whole = _checkpoint(tmp_path / "whole" / "checkpoints" / "last.ckpt")

    train(compose_train(tmp_path / "stopped", *run, "trainer.max_steps=10"))
    stopped = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    saved = _checkpoint(stopped)
    assert (saved["global_step"], saved["epoch"]) == (10, 1)  # the second epoch, unfinished
    assert saved["ImageDataModule"]["train_order"]["epoch"] == 1

    train(compose_train(tmp_path / "resumed", *run, "trainer.max_steps=17", f"ckpt_path={stopped}"))
    resumed = _checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert (resumed["global_step"], resumed["epoch"]) == (whole["global_step"], whole["epoch"])
    for name, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][name]), name


def test_kill_during_checkpoint_save_leaves_the_previous_one_loadable(tmp_path: Path) -> None:
    result = run_cli(
        *LONG_RUN,
        f"hydra.run.dir={tmp_path}",
        "+callbacks.kill._target_=tests.killers.KillDuringSave",
        "+callbacks.kill.step=4",
        check=False,
    )
    assert result.returncode == -9
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert _checkpoint(last)["global_step"] == 2  # the save before the one killed
    (partial,) = (tmp_path / "checkpoints").glob(".last.ckpt.*.partial")  # its own name
    assert partial.stat().st_size > 0  # half written, left by the kill
    CVAE.load_from_checkpoint(last, weights_only=False)
    train(compose_train(tmp_path / "resumed", *LONG_RUN, f"ckpt_path={last}"))
    assert _checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 14


def _rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "summary.csv") as handle:
        return list(csv.DictReader(handle))


def test_ddp_on_two_cpu_processes_in_a_sweep(tmp_path: Path) -> None:
    """Each job's ranks train that job's model (DDP fails on unequal shapes otherwise) in
    that job's folder; nothing else is created and the summary counts each job once."""
    sweep, logs = tmp_path / "sweep", tmp_path / "logs"
    run_cli(
        "trainer=ddp_cpu",
        "model.latent_dim=4,8",
        "test=false",
        f"paths.log_dir={logs}",
        f"hydra.sweep.dir={sweep}",
        multirun=True,
    )
    assert not logs.exists()  # no rank started a run or a sweep of its own
    rows = _rows(sweep)
    assert sorted(r["overrides"] for r in rows) == ["model.latent_dim=4", "model.latent_dim=8"]
    for job, latent in (("0", 4), ("1", 8)):
        folder = sweep / job
        assert (folder / "train_ddp_process_1.log").is_file()  # rank 1 ran here
        assert len(list((folder / "tensorboard").glob("events.out.tfevents.*"))) == 1
        model = CVAE.load_from_checkpoint(folder / "checkpoints" / "last.ckpt", weights_only=True)
        assert model.hparams.latent_dim == latent
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == [
            "epoch_000.ckpt",
            "last.ckpt",
            "last.gmm.pt",
        ]  # rank 0 fitted the sampler


def test_submitit_local_launcher_runs_the_sweep(tmp_path: Path) -> None:
    run_cli(
        "hydra/launcher=submitit_local",
        "model.beta=1,2",
        "test=false",
        f"hydra.sweep.dir={tmp_path}",
        multirun=True,
    )
    rows = _rows(tmp_path)
    assert sorted(r["overrides"] for r in rows) == ["model.beta=1", "model.beta=2"]
    assert all(r["status"] == "completed" for r in rows)
    assert list(tmp_path.glob(".submitit/*"))  # the jobs went through submitit


@pytest.mark.filterwarnings("ignore")
def test_optuna_sweep_minimises_the_objective(tmp_path: Path) -> None:
    run_cli(
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "test=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    rows = _rows(tmp_path)
    assert len(rows) == 3 and all(r["status"] == "completed" for r in rows)
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    # what cvae.train returned: the final val/neg_elbo, not val/loss (its beta varies)
    assert best["best_value"] == pytest.approx(min(float(r["neg_elbo"]) for r in rows))
    assert best["best_value"] == pytest.approx(float(rows[0]["objective"]))


@pytest.mark.filterwarnings("ignore")
def test_optuna_rate_distortion_keeps_a_pareto_front(tmp_path: Path) -> None:
    run_cli(
        "hparams_search=optuna_rate_distortion",
        "hydra.sweeper.n_trials=2",
        "test=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    rows = _rows(tmp_path)
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows)
    front = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())["solutions"]
    points = {(float(r["rate_kl"]), float(r["distortion_recon"])) for r in rows}
    assert front and all(tuple(trial["values"]) in points for trial in front)
