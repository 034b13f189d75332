"""Training end to end: the CLI, run folders, TensorBoard, sweeps, resume and NaN stops."""

from __future__ import annotations

import logging
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import Timer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cvae import CVAE, ImageDataModule
from cvae.callbacks import TextProgress, plan_line, timed_line
from cvae.errors import CheckpointError
from cvae.training import build, train
from tests.helpers import REPO, TINY, compose_train, event_tags, run_cli, write_broken_files


@pytest.mark.slow
def test_cli_run_leaves_checkpoints_and_tensorboard(tmp_path: Path) -> None:
    result = run_cli(
        "trainer.max_epochs=2",
        f"hydra.run.dir={tmp_path}",
        "callbacks.text_progress.every_minutes=0.0001",
    )
    # stdout is not a terminal here: progress comes as log lines, in the run's train.log too
    log = (tmp_path / "train.log").read_text()
    for epoch in (1, 2):
        time = r"[\d.]+ (?:s|min|h)"  # 45 s, 1.6 min (a busy machine)
        line = re.search(
            rf"epoch end: epoch {epoch}/2, step (\d+)/(\d+), \d+ images/s, "
            rf"{time} elapsed, about {time} left; train/loss [\d.]+, "
            r"(?:train/loss_epoch [\d.]+, )?val/loss [\d.]+, val/neg_elbo [\d.]+, "
            r"val/mse [\d.]+\n",
            log,
        )
        assert line and int(line[1]) == epoch * int(line[2]) // 2, log
        assert line[0] in result.stdout
    assert re.search(r"\] - epoch 1/2, step \d+/\d+, ", log)  # between epoch ends too
    # its expected length comes before the first step
    planned = re.search(r"expected length: (\d+) steps \(2 epochs x (\d+) steps, ", log)
    assert planned and int(planned[1]) == 2 * int(planned[2]), log
    assert planned.start() < log.index("epoch 1/2, step")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert len(list((tmp_path / "checkpoints").glob("epoch_*.ckpt"))) == 1  # the best one
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "resolved_config.yaml").is_file()
    tags = event_tags(tmp_path)
    for scalar in (
        "train/loss",
        "train/recon",
        "train/kl",
        "val/loss",
        "val/recon",
        "val/kl",
        "val/active_units",
        "val/mse",  # curves that move visibly beside the NLL
        "val/bits_per_dim",
        "train/loss_epoch",  # a training curve even for runs shorter than log_every_n_steps
        "lr-Adam",
        "test/loss",
        "val/neg_elbo",  # the default sweep objective
        "hp/val_loss",
        "hp/val_neg_elbo",  # the hparams tab has what a sweep objective can name
        "hp/val_bits_per_dim",
        "hp/val_mse",
        "hp/val_active_units",
    ):
        assert scalar in tags["scalars"]
    assert tags["histograms"] == ["val/kl_per_dim"]
    assert "_hparams_/session_start_info" in tags["hparams"]  # the hparams tab has this run
    for image in ("data/train_batch", "val/reconstructions", "val/samples", "colour/histograms"):
        assert image in tags["images"]
    for channel in ("red", "green", "blue"):  # the shapes are RGB: colour is checked
        for scalar in ("mae", "w1_reconstructions", "w1_samples"):
            assert f"colour/{scalar}_{channel}" in tags["scalars"]


@pytest.mark.slow
def test_cli_trains_on_a_folder_of_mixed_and_broken_files(
    tmp_path: Path, mixed_folder: Path
) -> None:
    broken = write_broken_files(mixed_folder / "broken")
    run_dir = tmp_path / "run"
    result = run_cli(
        "data=folder", f"data.root={mixed_folder}", "data.batch_size=4", f"hydra.run.dir={run_dir}"
    )
    report = "16 images used, 5 skipped"
    assert report in result.stdout + result.stderr
    assert report in (run_dir / "train.log").read_text()  # kept with the run
    assert all(f"broken/{path.name}" in result.stdout + result.stderr for path in broken.values())
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    datamodule = ImageDataModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert datamodule.hparams.root == str(mixed_folder)


def test_training_with_batches_kept_on_the_device(tmp_path: Path) -> None:
    metrics = train(compose_train(tmp_path, "data.on_device=true", "test=false"))
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.mark.slow
def test_cli_sweep_leaves_one_run_folder_per_job(tmp_path: Path) -> None:
    run_cli(
        "model.beta=0.5,1",
        "model.latent_dim=4,8",
        "test=false",
        f"hydra.sweep.dir={tmp_path}",
        multirun=True,
    )
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name != ".hydra")
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    seen = set()
    for job in jobs:
        model = CVAE.load_from_checkpoint(job / "checkpoints" / "last.ckpt", weights_only=True)
        seen.add((model.hparams.beta, model.hparams.latent_dim))
    assert seen == {(0.5, 4), (0.5, 8), (1.0, 4), (1.0, 8)}


@pytest.mark.slow
def test_cli_bad_config_is_one_line_before_training(tmp_path: Path) -> None:
    result = run_cli("model.latent_dim=0", f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == "error: model.latent_dim must be a positive integer, got 0"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "tensorboard").exists()  # no logger, so no trainer, was built


def test_missing_resume_checkpoint_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_train(tmp_path, f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(CheckpointError, match="ckpt_path=.*nope.ckpt does not exist"):
        train(cfg)


def test_checkpoint_hyperparameters_are_plain_values(trained_run: Path) -> None:
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["hidden_channels"] == [8, 16]
    assert checkpoint["datamodule_hyper_parameters"]["source"] == "synthetic"


def test_loaded_checkpoint_samples_and_reconstructs(trained_run: Path) -> None:
    model = CVAE.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    samples = model.sample(16)
    assert samples.shape == (16, 3, 16, 16)
    x = torch.rand(5, 3, 16, 16)
    reconstructions = model.reconstruct(x)
    assert reconstructions.shape == x.shape
    for images in (samples, reconstructions):  # each image decoded from its own latent
        assert not torch.allclose(images[0], images[1])


def test_resume_continues_at_the_saved_epoch_and_step(trained_run: Path, tmp_path: Path) -> None:
    last = trained_run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    steps_per_epoch = saved["global_step"] // 2  # two whole epochs done
    assert saved["ImageDataModule"]["train_order"]["positions_done"] == 0  # nothing to skip
    cfg = compose_train(tmp_path, f"ckpt_path={last}", "trainer.max_epochs=3", "test=false")
    datamodule, model, trainer = build(cfg)
    started = {}

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            started.setdefault("epoch", trainer.current_epoch)
            started.setdefault("step", trainer.global_step)

    trainer.callbacks.append(FirstStep())
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    assert started == {"epoch": 2, "step": 2 * steps_per_epoch}
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3 * steps_per_epoch


@pytest.mark.parametrize("where", ["loss", "gradients"])
def test_a_non_finite_step_is_skipped_counted_and_leaves_the_weights(
    tmp_path: Path, where: str
) -> None:
    cfg = compose_train(tmp_path, "trainer.max_epochs=2", "test=false")
    datamodule, model, trainer = build(cfg)
    seen: dict[str, object] = {}

    class Sabotage(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step != 2 or "before" in seen:
                return
            seen["before"] = {k: v.clone() for k, v in pl_module.named_parameters()}
            if where == "loss":
                original = pl_module.loss_terms

                def poisoned(x, **kwargs):
                    pl_module.loss_terms = original  # once
                    terms = original(x, **kwargs)
                    return {**terms, "loss": terms["loss"] * float("inf")}

                pl_module.loss_terms = poisoned
            else:
                weight = list(pl_module.decoder.parameters())[-2]  # the last layer's weight
                handle = weight.register_hook(lambda g: (handle.remove(), g * float("nan"))[1])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if "before" in seen and "after" not in seen:
                seen["after"] = {k: v.clone() for k, v in pl_module.named_parameters()}

    trainer.callbacks.append(Sabotage())
    trainer.fit(model, datamodule=datamodule)
    assert model.skipped_steps == 1 and trainer.state.finished
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])


def test_same_seed_and_deterministic_trainer_give_the_same_losses(tmp_path: Path) -> None:
    curves = []
    for name in ("a", "b"):
        train(
            compose_train(
                tmp_path / name, "trainer.deterministic=true", "test=false", "trainer.max_epochs=2"
            )
        )
        (events,) = (tmp_path / name / "tensorboard").glob("events.out.tfevents.*")
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        curves.append(
            [
                (e.step, e.value)
                for tag in ("train/loss", "val/loss")
                for e in accumulator.Scalars(tag)
            ]
        )
    assert len(curves[0]) > 4 and curves[0] == curves[1]


def test_ckpt_path_last_resumes_the_newest_run(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    runs = tmp_path / "logs" / "train" / "runs"
    for name in ("older", "newer"):
        (runs / name / "checkpoints").mkdir(parents=True)
        shutil.copy(trained_run / "checkpoints" / "last.ckpt", runs / name / "checkpoints")
    cfg = compose_train(
        tmp_path / "run",
        f"paths.log_dir={tmp_path / 'logs'}",
        "ckpt_path=last",
        "trainer.max_epochs=3",
        "test=false",
    )
    datamodule, model, trainer = build(cfg)
    assert cfg.ckpt_path == str(runs / "newer" / "checkpoints" / "last.ckpt")
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    assert trainer.current_epoch == 3  # continued from epoch 2 of the copied run
    missing = compose_train(tmp_path / "x", f"paths.log_dir={tmp_path / 'none'}", "ckpt_path=last")
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no .*none/train/runs"):
        build(missing)


@pytest.mark.parametrize("stage", ["train", "val"])
def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    loss_terms = CVAE.loss_terms

    def diverge_in_second_epoch(self: CVAE, x: torch.Tensor, **kwargs) -> dict:
        terms = loss_terms(self, x, **kwargs)
        if self.training == (stage == "train") and self.current_epoch == 1:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(CVAE, "loss_terms", diverge_in_second_epoch)
    message = rf"{stage}/loss is nan at epoch 2, step \d+"  # numbered from 1
    if stage == "train":  # skipped and counted until max_bad_steps in a row
        message += ": 3 training steps in a row were skipped"
    with pytest.raises(FloatingPointError, match=message):
        train(compose_train(tmp_path, "trainer.max_epochs=3", "model.max_bad_steps=3"))
    good = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert good["epoch"] == 0
    assert all(torch.isfinite(t).all() for t in good["state_dict"].values())


def test_a_gradient_spike_is_skipped_counted_and_leaves_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`model.skip_updates_above`: an update whose gradient norm jumps far above its running
    level is dropped (the weights and optimizer moments stay), counted, and training goes
    on; the level and the count travel in the checkpoint."""
    import cvae.models.cvae

    monkeypatch.setattr(cvae.models.cvae, "SKIP_WARMUP", 2)
    cfg = compose_train(
        tmp_path, "trainer.max_epochs=2", "test=false", "model.skip_updates_above=10"
    )
    datamodule, model, trainer = build(cfg)
    seen: dict[str, object] = {}

    class Spike(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_step != 4 or "before" in seen:
                return
            seen["before"] = {k: v.clone() for k, v in pl_module.named_parameters()}
            weight = list(pl_module.decoder.parameters())[-2]
            handle = weight.register_hook(lambda g: (handle.remove(), g * 1e6)[1])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if "before" in seen and "after" not in seen:
                seen["after"] = {k: v.clone() for k, v in pl_module.named_parameters()}

    trainer.callbacks.append(Spike())
    trainer.fit(model, datamodule=datamodule)
    assert int(model.skipped_updates) == 1 and trainer.state.finished
    assert all(torch.equal(seen["before"][k], seen["after"][k]) for k in seen["before"])
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert int(saved["skipped_updates"]) == 1 and float(saved["grad_norm_level"]) > 0
    with pytest.raises(ValueError, match=r"model.skip_updates_above must be null or a number > 1"):
        CVAE(skip_updates_above=0.5)


@pytest.mark.slow
def test_callbacks_ema_keeps_an_average_that_the_commands_load(tmp_path: Path) -> None:
    """`callbacks=ema`: checkpoints hold the exponential moving average as their weights (what
    every command loads) and the live weights beside them, to resume training from."""
    from cvae.models import from_checkpoint

    train(
        compose_train(
            tmp_path, "callbacks=ema", "trainer.max_epochs=2", "test=false", "sampler=prior"
        )
    )
    checkpoint = torch.load(tmp_path / "checkpoints" / "epoch_000.ckpt", weights_only=True)
    key = "decoder.project.0.weight"
    average, live = checkpoint["state_dict"][key], checkpoint["current_model_state"][key]
    assert not torch.equal(average, live)
    assert torch.equal(from_checkpoint(checkpoint).state_dict()[key], average)


def _trainer(*callbacks: Callback, **settings: object) -> SimpleNamespace:
    """What TextProgress reads of a trainer: 50 epochs of 844 steps, at step 100."""
    defaults = {
        "global_step": 100,
        "estimated_stepping_batches": 42_200,
        "max_epochs": 50,
        "max_steps": -1,
        "num_training_batches": 844,
        "accumulate_grad_batches": 1,
        "current_epoch": 0,
        "is_global_zero": True,
        "callback_metrics": {},
        "world_size": 1,
    }
    return SimpleNamespace(callbacks=list(callbacks), **(defaults | settings))


def test_the_time_left_ends_at_max_time_when_that_comes_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One second before a 6-minute limit the line says 1 s, not the hours the steps need."""
    timer = Timer(duration="00:00:06:00")
    timer.load_state_dict({"time_elapsed": {"train": 359.0}})  # a resumed run's clock too
    lines = {}
    for name, callbacks in (("limited", [timer]), ("free", [])):
        trainer = _trainer(*callbacks)
        progress = TextProgress(when="always")
        progress.on_train_start(trainer, None)
        progress.started -= 100  # 10 steps in 100 s: 42,090 steps left take 116.9 h
        trainer.global_step = 110
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cvae.callbacks"):
            progress.on_train_epoch_end(trainer, None)
        lines[name] = caplog.messages[-1]
    assert "about 1 s left (trainer.max_time)" in lines["limited"]
    assert "about 116.9 h left;" in lines["free"] or lines["free"].endswith("about 116.9 h left")


def test_the_expected_length_names_what_ends_the_run() -> None:
    six_minutes = Timer(duration="00:00:06:00")
    assert plan_line(_trainer(global_step=0)).startswith(
        "expected length: 42,200 steps (50 epochs x 844 steps, trainer.max_epochs=50); the "
        "time follows once the first steps are timed"
    )
    by_steps = plan_line(_trainer(global_step=0, max_steps=1000))
    assert "1,000 steps (trainer.max_steps=1000; 50 epochs of 844 steps would be 42,200)" in (
        by_steps
    )
    resumed = plan_line(_trainer(six_minutes, global_step=1200))
    assert ", 41,000 left from step 1,200; trainer.max_time stops it after 6.0 min" in resumed
    timed = timed_line(_trainer(six_minutes, global_step=0), 0.5)  # the timer not started
    assert timed.startswith(
        "timed: 0.5 s per step: trainer.max_time stops it in 6.0 min, near step 720 of 42,200"
    )
    assert timed_line(_trainer(global_step=0), 0.5).startswith(
        "timed: 0.5 s per step: the 42,200 steps take about 5.9 h"
    )


# The rich bar back in a tiny run (TINY drops it): what a user's run has.
WITH_BAR = [
    "+callbacks.rich_progress_bar._target_=cvae.callbacks.ProgressBar",
    "trainer.enable_progress_bar=true",
    "trainer.max_epochs=2",
    "test=false",
    "sampler=prior",
]


def _in_a_terminal(*overrides: str, timeout: float = 300) -> str:
    """What `python -m cvae.train` with the tiny settings shows in a terminal (a
    pseudo-terminal), escape sequences removed."""
    leader, follower = pty.openpty()
    command = [sys.executable, "-m", "cvae.train", *TINY, *overrides]
    process = subprocess.Popen(command, cwd=REPO, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([leader], [], [], 1.0)[0]:
            continue
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the run ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=30) == 0
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))


@pytest.mark.slow
def test_the_bar_numbers_epochs_from_1_and_stays_out_of_log_files(tmp_path: Path) -> None:
    """Lightning's bar says `Epoch 0/1` where the lines say `epoch 1/2`; and in a log file
    (stdout not a terminal) it wrote its last frame there."""
    logged = run_cli(*WITH_BAR, f"hydra.run.dir={tmp_path / 'logged'}")
    assert "epoch end: epoch 2/2, step" in logged.stdout  # the lines instead
    assert "Epoch " not in logged.stdout + logged.stderr  # no bar frame
    shown = _in_a_terminal(*WITH_BAR, f"hydra.run.dir={tmp_path / 'shown'}")
    assert "Epoch 1/2" in shown and "Epoch 2/2" in shown
    assert "Epoch 0/" not in shown
