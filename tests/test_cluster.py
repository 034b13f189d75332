"""Cluster runs that outlive their time limit, without a cluster: a run started again in its
folder resumes from its own last.ckpt, SIGUSR2 saves the step before submitit requeues (a
whole requeue through the submitit_local launcher), the resume line of a launcher job
resubmits through the launcher, the SLURM launcher configs fit the trainer, and jobs are
followed with squeue where sacct is off. The same on a real one-node SLURM cluster:
docs/development.md (tests/cluster/start_slurm.sh; never run by `make test`)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from cvae.errors import Interrupted
from cvae.training import resume_command, train
from tests.helpers import CONF_DIR, LONG_RUN, compose_train, load_checkpoint, run_cli, same_weights

pytestmark = pytest.mark.slow  # every test here runs real commands or trainings


def _stop_at(step: int, signum: int) -> list[str]:
    return [
        "+callbacks.stop._target_=tests.killers.SignalAt",
        f"+callbacks.stop.step={step}",
        f"+callbacks.stop.signum={int(signum)}",
    ]


def test_a_run_started_again_in_its_folder_resumes_from_its_last_ckpt(
    tmp_path: Path, uninterrupted: dict, caplog: pytest.LogCaptureFixture
) -> None:
    """What a requeued SLURM job does: the same config in the same folder, ckpt_path null."""
    with pytest.raises(Interrupted):
        train(compose_train(tmp_path, *LONG_RUN, *_stop_at(4, signal.SIGTERM)))
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5
    caplog.set_level("INFO", logger="cvae.training")
    train(compose_train(tmp_path, *LONG_RUN))
    own = tmp_path / "checkpoints" / "last.ckpt"
    assert f"already holds {own} (epoch 1, step 5) from an earlier start" in caplog.text
    final = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 14
    assert same_weights(uninterrupted, final)  # continued exactly, not started over


@pytest.fixture
def submitit_handler() -> Iterator[list]:
    """A stand-in for submitit's SIGUSR2 handler in a job: records the step of last.ckpt
    when it is called, then requeues (exits) as submitit's does on rank 0."""
    calls: list = []
    previous = signal.getsignal(signal.SIGUSR2)

    def requeue(signum: int, frame: object) -> None:
        calls.append(signum)
        raise SystemExit(-1)

    signal.signal(signal.SIGUSR2, requeue)
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_sigusr2_saves_the_step_then_hands_the_signal_to_submitit(
    tmp_path: Path, submitit_handler: list
) -> None:
    with pytest.raises(SystemExit):
        train(compose_train(tmp_path, *LONG_RUN, *_stop_at(4, signal.SIGUSR2)))
    assert submitit_handler == [signal.SIGUSR2]  # called once, after the save
    assert load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 5


def test_a_job_submitit_does_not_requeue_stops_with_the_reason_and_a_resume_line(
    tmp_path: Path, submitit_handler: list
) -> None:
    def no_requeue(signum: int, frame: object) -> None:
        raise RuntimeError("Job not requeued because: timed-out too many times.")

    signal.signal(signal.SIGUSR2, no_requeue)
    with pytest.raises(Interrupted) as stop:
        train(compose_train(tmp_path, *LONG_RUN, *_stop_at(4, signal.SIGUSR2)))
    message = str(stop.value)
    assert message.startswith("SIGUSR2: training stopped at epoch 1, step 5; saved ")
    assert "; Job not requeued because: timed-out too many times; resume with: " in message
    assert stop.value.exit_status == 128 + signal.SIGUSR2


def test_a_rank_that_does_not_requeue_gives_no_resume_line(
    tmp_path: Path, submitit_handler: list
) -> None:
    """Under DDP submitit requeues on rank 0 and returns on the others: those say that rank
    0 requeues the job, and give no resume command (the job comes back by itself)."""

    def returns(signum: int, frame: object) -> None:
        submitit_handler.append(signum)

    signal.signal(signal.SIGUSR2, returns)
    with pytest.raises(Interrupted) as stop:
        train(compose_train(tmp_path, *LONG_RUN, *_stop_at(4, signal.SIGUSR2)))
    message = str(stop.value)
    assert message.startswith("SIGUSR2: training stopped at epoch 1, step 5; saved ")
    assert message.endswith("; rank 0 stops, rank 0 requeues the job")
    assert "resume with" not in message and stop.value.requeued
    assert submitit_handler == [signal.SIGUSR2]


def test_a_requeued_launcher_job_continues_exactly_in_its_folder(
    tmp_path: Path, uninterrupted: dict
) -> None:
    """submitit_local requeues the way SLURM does: the same pickled job started again."""
    sweep = tmp_path / "sweep"
    run_cli(
        *LONG_RUN,
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        *_stop_at(4, signal.SIGUSR2),
        multirun=True,
    )
    job = sweep / "0"
    final = load_checkpoint(job / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 14
    assert same_weights(uninterrupted, final)
    log = (job / "train.log").read_text()
    assert "handing SIGUSR2 to submitit to requeue the job" in log
    assert "(epoch 1, step 5) from an earlier start" in log
    assert "completed" in (sweep / "summary.csv").read_text()


def test_a_launcher_job_that_ends_without_a_result_is_one_row_and_one_line(
    tmp_path: Path,
) -> None:
    """Two ways a launcher job ends without a result, in one sweep: SIGTERM (what scancel
    sends: the job saves, says so, records itself as interrupted) and SIGKILL (a node
    failure: the job records nothing)."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "hydra/launcher=submitit_local",
        "trainer.max_epochs=1,3",  # 4 steps an epoch: only jobs 2 and 3 (3 epochs) reach step 4
        "+callbacks.stop.signum=15,9",  # SIGTERM in jobs 0 and 2, SIGKILL in jobs 1 and 3
        "test=false",
        "sampler=prior",
        "+callbacks.stop._target_=tests.killers.SignalAt",
        "+callbacks.stop.step=4",
        "+hydra.callbacks.no_wait._target_=tests.killers.NoWaitForMissingResults",
        f"hydra.sweep.dir={sweep}",
        multirun=True,
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "sweep ended: 2 completed, 1 interrupted (job 2), 1 incomplete (job 3); "
        f"see {sweep}/summary.md; continue with: "
    )
    ended = re.findall(r"job \d+ ended without a result \(state \w+\)", result.stdout)
    assert len(ended) == 2, result.stdout[-3000:]  # named by submitit's job ids
    rows = (sweep / "summary.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[:2] for row in rows) == [
        ["0", "completed"],
        ["1", "completed"],
        ["2", "interrupted"],
        ["3", "incomplete"],
    ]


@pytest.fixture
def launcher_job(tmp_path: Path) -> Iterator[DictConfig]:
    """The config of job 3 of a `-m hydra/launcher=slurm_cpu` sweep, as the job sees it."""
    overrides = [
        "hydra/launcher=slurm_cpu",
        "hydra.launcher.partition=cpu",
        "hydra.sweep.dir=/scratch/sweep",
        "trainer=ddp_cpu",
        "model.beta=2",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.job.num = 3
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "3")
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = None


def test_the_resume_line_of_a_launcher_job_resubmits_it_into_its_folder(
    launcher_job: DictConfig, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "sweep" / "3" / "checkpoints" / "last.ckpt"
    words = shlex.split(resume_command(launcher_job, checkpoint))
    assert words[1:4] == ["-m", "cvae.train", "-m"]  # a sweep of one job, through the launcher
    assert {
        "hydra/launcher=slurm_cpu",
        "hydra.launcher.partition=cpu",
        "trainer=ddp_cpu",
        "model.beta=2",
    } <= set(words)
    assert f"hydra.sweep.dir={tmp_path / 'sweep'}" in words
    assert "hydra.sweep.dir=/scratch/sweep" not in words
    assert words[-2:] == ["hydra.sweep.subdir=3", f"ckpt_path={checkpoint}"]


# --- the launcher configs ----------------------------------------------------------------------
def _launcher_config(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize(
    ("overrides", "gpus", "tasks"),
    [
        (["hydra/launcher=slurm", "trainer=gpu"], 1, 1),
        (["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"], 4, 4),
        (["hydra/launcher=slurm_cpu", "trainer=ddp_cpu"], None, 2),
        (["hydra/launcher=slurm_cpu", "trainer=cpu"], None, 1),
    ],
)
def test_the_slurm_launchers_ask_for_what_the_trainer_uses(
    overrides: list[str], gpus: int | None, tasks: int
) -> None:
    from cvae.cluster import check_request

    cfg = _launcher_config(*overrides)
    check_request(cfg)
    launcher = cfg.hydra.launcher
    assert (launcher.gpus_per_node, launcher.tasks_per_node) == (gpus, tasks)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s >= 60
    assert "slurm_checks" in cfg.hydra.callbacks and "sweep_summary" in cfg.hydra.callbacks


@pytest.mark.parametrize(
    ("overrides", "said"),
    [
        (["hydra/launcher=slurm", "trainer=ddp_cpu"], "use hydra/launcher=slurm_cpu"),
        (["hydra/launcher=slurm_cpu", "trainer=gpu"], "the job would get no GPU"),
        (["hydra/launcher=slurm", "trainer=ddp"], "give it as a number, e.g. trainer.devices=4"),
        (["hydra/launcher=slurm_cpu"], "it is auto"),
    ],
)
def test_a_request_slurm_cannot_give_the_trainer_is_one_line(
    overrides: list[str], said: str
) -> None:
    from cvae.cluster import check_request

    with pytest.raises(ValueError, match=said.replace(".", r"\.")) as error:
        check_request(_launcher_config(*overrides))
    assert "\n" not in str(error.value)


# --- following jobs without accounting ---------------------------------------------------------
def _fake_command(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_without_accounting_jobs_are_followed_with_squeue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvae.cluster import LEFT_QUEUE, QueueWatcher

    _fake_command(tmp_path, "sacct", "echo 'Slurm accounting storage is disabled' >&2; exit 1\n")
    _fake_command(
        tmp_path,
        "squeue",
        "printf '7|CANCELLED|vm\\n8_0|RUNNING|vm\\n8_[1-2]|PENDING|\\n10|CONFIGURING|vm\\n'\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    watcher = QueueWatcher()
    for job in ("7", "8_0", "8_1", "9", "10"):
        watcher.register_job(job)
    watcher.update()
    assert not watcher.accounting
    assert watcher.get_state("9", mode="cache") == LEFT_QUEUE  # ended before MinJobAge
    done = {job: watcher.is_done(job, mode="cache") for job in ("7", "8_0", "8_1", "9", "10")}
    assert done == {"7": True, "8_0": False, "8_1": False, "9": True, "10": False}
