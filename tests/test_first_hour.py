"""What a new user meets: interrupts that keep the work, damaged files and full disks that
fail in one line and lose nothing, data roots that are never created, a fast quiet start."""

from __future__ import annotations

import errno
import gzip
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from cvae import ImageDataModule
from cvae.data import cache, datamodule, presets
from cvae.errors import run_or_report
from cvae.evaluation import evaluate_checkpoint
from cvae.training import train
from tests.helpers import (
    LONG_RUN,
    REPO,
    compose_tool,
    compose_train,
    load_checkpoint,
    run_cli,
    same_weights,
    write_mixed_images,
)


def _stopped_run(
    run: Path, signum: int, step: int, killer: str = "SignalAt"
) -> tuple[str, str, dict]:
    """The LONG_RUN on the command line, sent `signum` by `tests.killers.<killer>` at step
    `step`: the last line it printed, all it printed, and the checkpoint it left."""
    stop = [
        f"+callbacks.stop._target_=tests.killers.{killer}",
        f"+callbacks.stop.step={step}",
        f"+callbacks.stop.signum={int(signum)}",
    ]
    result = run_cli(*LONG_RUN, f"hydra.run.dir={run}", *stop, check=False)
    assert result.returncode == 128 + signum
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    return last_line, result.stdout + result.stderr, last


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_prints_a_resume_command_that_continues_exactly(
    tmp_path: Path, uninterrupted: dict
) -> None:
    run = tmp_path / "run"
    last_line, printed, saved = _stopped_run(run, signal.SIGINT, 11)
    assert "Ctrl-C: saving last.ckpt after this step (Ctrl-C again quits at once)" in printed
    assert last_line.startswith("Ctrl-C: training stopped at epoch 2, step 12; saved ")
    assert saved["global_step"] == 12  # the step that was running finished, then it saved
    command = last_line.split("resume with: ", 1)[1]
    assert f"hydra.run.dir={run}" in command  # the folder the user chose: it goes on there
    resumed = subprocess.run(
        command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300
    )  # warnings shown, as a user sees them
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    said = resumed.stdout + resumed.stderr
    assert "your dataloader is not resumable" not in said  # false here: it resumes exactly
    assert "The dirpath has changed" not in said
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 14
    assert same_weights(uninterrupted, final)


@pytest.mark.slow
def test_sigterm_saves_and_the_resumed_run_ends_with_thesame_weights(
    tmp_path: Path, uninterrupted: dict
) -> None:
    last_line, printed, saved = _stopped_run(tmp_path / "run", signal.SIGTERM, 4)
    assert "SIGTERM: saving last.ckpt after this step" in printed
    assert "quits at once" not in printed  # only after a Ctrl-C does a second one quit
    assert last_line.startswith("SIGTERM: training stopped at epoch 1, step 5; saved ")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    train(compose_train(tmp_path / "resumed", *LONG_RUN, f"ckpt_path={last}"))
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert same_weights(uninterrupted, resumed)


@pytest.mark.slow
def test_sigterm_during_the_last_validation_stops_before_what_follows_training(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    last_line, printed, saved = _stopped_run(run, signal.SIGTERM, 14, "SignalAtValidation")
    assert "SIGTERM: saving last.ckpt after this step" in printed
    assert last_line.startswith(
        "SIGTERM: training finished (step 14); what follows it (test, "
        "sampler fit) did not run; saved "
    )
    assert saved["global_step"] == 14
    assert not (run / "result.json").exists()  # the run did not pass for finished
    command = last_line.split("resume with: ", 1)[1]
    resumed = subprocess.run(
        command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run / "result.json").is_file()  # what followed training ran on resuming
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 14


def _stopped_after_training(run: Path, killer: str) -> tuple[str, str]:
    """A tiny run (4 steps, then the sampler fit and the test) on the command line, sent
    SIGTERM by `tests.killers.<killer>` after training: its last line and all it printed."""
    stop = [f"+callbacks.stop._target_=tests.killers.{killer}"]
    result = run_cli(f"hydra.run.dir={run}", "test=true", *stop, check=False)
    printed = result.stdout + result.stderr
    assert result.returncode == 143, printed[-3000:]
    assert "Traceback" not in result.stderr and "Detected KeyboardInterrupt" not in printed
    return result.stderr.strip().splitlines()[-1], printed


def _evaluate_command(checkpoint: Path) -> str:
    python = os.path.relpath(sys.executable, REPO)
    return f"test it with: {python} -m cvae.evaluate ckpt_path={checkpoint}"


@pytest.mark.slow
def test_sigterm_in_the_sampler_fit_after_training_says_what_is_left_in_one_line(
    tmp_path: Path,
) -> None:
    last_line, _ = _stopped_after_training(tmp_path, "SignalInSamplerFit")
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last_line == (
        f"SIGTERM: training finished (step 4; saved {last}), but sampler=gmm was not fitted "
        f"to it: fit it with: .venv/bin/python -m cvae.generate mode=fit sampler=gmm "
        f"ckpt_path={last}; the test did not run either: "
        + _evaluate_command(tmp_path / "checkpoints" / "epoch_000.ckpt")
    )
    assert not (tmp_path / "checkpoints" / "last.gmm.pt").exists()


@pytest.mark.slow
def test_sigterm_in_the_test_after_training_says_what_is_left_in_one_line(
    tmp_path: Path,
) -> None:
    last_line, printed = _stopped_after_training(tmp_path, "SignalAtTest")
    assert "SIGTERM: stopping the test after this batch" in printed
    assert last_line == (
        f"SIGTERM: training finished (step 4; {tmp_path / 'result.json'} written), the test "
        "did not: " + _evaluate_command(tmp_path / "checkpoints" / "epoch_000.ckpt")
    )
    assert (tmp_path / "result.json").is_file()
    assert (tmp_path / "checkpoints" / "last.gmm.pt").is_file()  # the fit before it finished


@pytest.mark.parametrize("mode", ["fit", "sample"])  # sample: the fit of a missing sampler
def test_sigterm_in_a_sampler_fit_is_one_line(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, mode: str
) -> None:
    from cvae.generation import generate
    from cvae.samplers import GaussianMixtureSampler

    checkpoint = tmp_path / "last.ckpt"
    shutil.copy(trained_run / "checkpoints" / "last.ckpt", checkpoint)
    fit = GaussianMixtureSampler.fit

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's kill, mid-fit
        return fit(*args, **kwargs)

    monkeypatch.setattr(GaussianMixtureSampler, "fit", terminated)
    cfg = compose_tool("generate", tmp_path / "out", f"ckpt_path={checkpoint}", f"mode={mode}")
    with pytest.raises(SystemExit) as stopped:
        run_or_report(generate, cfg)
    assert stopped.value.code == 143
    assert capsys.readouterr().err.strip().splitlines() == [
        f"SIGTERM: sampler=gmm was not fitted to {checkpoint}; the same command fits it"
    ]
    assert not (tmp_path / "last.gmm.pt").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back


def test_a_resumed_run_logs_what_the_first_one_did(trained_run: Path, tmp_path: Path) -> None:
    from tests.helpers import event_tags

    last = trained_run / "checkpoints" / "last.ckpt"
    train(compose_train(tmp_path, f"ckpt_path={last}", "trainer.max_epochs=3", "test=false"))
    tags = event_tags(tmp_path)
    assert "data/train_batch" in tags["images"]
    assert {"lr-Adam", "train/loss_epoch", "val/mse"} <= set(tags["scalars"])


# --- damaged checkpoints ---------------------------------------------------------------------
def _damaged_files(folder: Path, good: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        kind: folder / f"{kind}.ckpt" for kind in ("truncated", "empty", "png", "text", "foreign")
    }
    data = good.read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    Image.new("RGB", (4, 4)).save(files["png"], "PNG")
    files["text"].write_text("not a checkpoint\n")
    torch.save({"weights": torch.zeros(3)}, files["foreign"])
    return files


REASONS = {
    "truncated": "damaged or truncated",
    "empty": "the file is empty",
    "png": "not a PyTorch file",
    "text": "not a PyTorch file",
    "foreign": "not one written by cvae.train",
}


@pytest.mark.parametrize("command", ["train", "eval", "generate", "export"])
def test_every_kind_of_bad_checkpoint_is_one_line_in_every_command(
    command: str, trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from cvae.exporting import run as export
    from cvae.generation import generate

    files = _damaged_files(tmp_path / "bad", trained_run / "checkpoints" / "last.ckpt")
    runs = {"train": train, "eval": evaluate_checkpoint, "generate": generate, "export": export}
    for kind, path in files.items():
        if command == "train":
            cfg = compose_train(tmp_path / kind, f"ckpt_path={path}")
        else:
            cfg = compose_tool(command, tmp_path / kind, f"ckpt_path={path}", "device=cpu")
        with pytest.raises(SystemExit) as stopped:
            run_or_report(runs[command], cfg)
        assert stopped.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: ckpt_path={path} is not a cvae checkpoint ("), lines[0]
        assert REASONS[kind] in lines[0]


@pytest.mark.parametrize("command", ["train", "eval", "generate", "export"])
def test_a_run_or_sweep_folder_as_ckpt_path_means_its_newest_last_checkpoint(
    command: str, trained_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every command reads `ckpt_path` through `loading.resolve_checkpoint`: a folder is
    its newest `checkpoints/last.ckpt`, named in the first line."""
    from cvae.loading import resolve_checkpoint

    sweep = tmp_path / "sweep"
    for job, age in (("1", 2), ("0", 1)):  # job 1 wrote last
        saved = sweep / job / "checkpoints" / "last.ckpt"
        saved.parent.mkdir(parents=True)
        shutil.copy(trained_run / "checkpoints" / "last.ckpt", saved)
        os.utime(saved, (1_000_000 + age, 1_000_000 + age))
    for folder, meant in (
        (trained_run, trained_run / "checkpoints" / "last.ckpt"),
        (trained_run / "checkpoints", trained_run / "checkpoints" / "last.ckpt"),
        (sweep, sweep / "1" / "checkpoints" / "last.ckpt"),
    ):
        if command == "train":
            cfg = compose_train(tmp_path / "out", f"ckpt_path={folder}")
        else:
            cfg = compose_tool(command, tmp_path / "out", f"ckpt_path={folder}", "device=cpu")
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cvae.loading"):
            checkpoint = resolve_checkpoint(cfg, resuming=command == "train")
        assert checkpoint["global_step"] > 0 and cfg.ckpt_path == str(meant)
        assert caplog.messages[0] == f"ckpt_path={folder}: {meant}"
    (tmp_path / "empty").mkdir()
    cfg = compose_tool("generate", tmp_path / "out", f"ckpt_path={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match=r"is a folder without a checkpoints/last.ckpt: give"):
        resolve_checkpoint(cfg)


def test_generate_runs_on_a_run_folder(trained_run: Path, tmp_path: Path) -> None:
    from cvae.generation import generate

    cfg = compose_tool(
        "generate", tmp_path, f"ckpt_path={trained_run}", "mode=sample", "n=4", "device=cpu"
    )
    assert (generate(cfg) / "samples.png").is_file()  # the fitted sampler found beside it


@pytest.mark.slow
def test_cli_bad_checkpoint_leaves_no_traceback_and_no_run_folder(
    trained_run: Path, tmp_path: Path
) -> None:
    bad = _damaged_files(tmp_path / "bad", trained_run / "checkpoints" / "last.ckpt")["png"]
    logs = tmp_path / "logs"
    result = subprocess.run(
        [sys.executable, "-m", "cvae.evaluate", f"ckpt_path={bad}", f"paths.log_dir={logs}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: ckpt_path={bad} is not a cvae checkpoint (not a PyTorch file)"
    ]
    assert not list(logs.glob("eval/*")), "a failed command left a run folder"


def test_non_finite_config_values_are_rejected_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit):
        run_or_report(train, compose_train(tmp_path, "model.beta=nan"))
    assert capsys.readouterr().err.strip() == "error: model.beta=nan is not a finite number"
    assert not (tmp_path / "checkpoints").exists()


# --- data roots ------------------------------------------------------------------------------
@contextmanager
def read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`folder` on a read-only file system: a read-only bind mount where this process may
    mount (root in a container), else file creation there failing as it would (EROFS)."""
    mount = folder.parent / f"{folder.name}-ro"
    mount.mkdir()
    if (
        subprocess.run(
            ["mount", "--bind", "-o", "ro", str(folder), str(mount)], capture_output=True
        ).returncode
        == 0
    ):
        try:
            yield mount
        finally:
            subprocess.run(["umount", str(mount)], check=True)
        return
    real = datamodule.tempfile.TemporaryFile

    def refuse(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own keyword
        if dir is not None and Path(dir).is_relative_to(mount):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dir))
        return real(*args, dir=dir, **kwargs)

    mount.rmdir()
    mount.symlink_to(folder)
    monkeypatch.setattr(datamodule.tempfile, "TemporaryFile", refuse)
    yield mount


def test_read_only_data_root_caches_in_the_user_folder(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    user_cache_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    images = tmp_path / "images"
    write_mixed_images(images, 12)
    before = sorted(p.name for p in images.iterdir())
    with read_only(images, monkeypatch) as root, caplog.at_level(logging.INFO):
        dm = ImageDataModule(root=str(root), image_size=16, batch_size=4)
        dm.setup()
        assert dm.cache_dir == user_cache_dir / "cvae"
        assert next(iter(dm.train_dataloader()))[0].shape == (4, 3, 16, 16)
    assert f"data.root={root} is not writable: the decoded-image cache goes to" in caplog.text
    assert sorted(p.name for p in images.iterdir()) == before  # nothing written there


def _fake_fashion_mnist(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("t10k", 10)):
        pixels = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in pixels.shape)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(
            gzip.compress(header + pixels.tobytes())
        )
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        header = bytes([0, 0, 8, 1]) + count.to_bytes(4, "big")
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(header + labels.tobytes())
        )
    return folder


def test_a_preset_root_that_does_not_exist_is_never_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    system = _fake_fashion_mnist(tmp_path / "system")
    monkeypatch.setattr(presets, "FASHION_MNIST_SYSTEM_DIR", system)
    typo = tmp_path / "nonexistent" / "fm"
    with caplog.at_level(logging.INFO):
        dm = ImageDataModule(source="fashion_mnist", root=str(typo), channels=1, image_size=16)
        dm.setup()
    assert len(dm.train_set) == 36
    assert not (tmp_path / "nonexistent").exists()
    assert f"fashion_mnist: images from {system}" in caplog.text  # where they came from
    assert f"data.root={typo} does not exist" in caplog.text

    def offline(root: str, **kwargs):  # what torchvision does offline: make the folder, fail
        Path(root, "FashionMNIST", "raw").mkdir(parents=True)
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(presets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-package")
    monkeypatch.setattr(presets, "_torchvision_class", lambda source: offline)
    with pytest.raises(
        FileNotFoundError, match="the download into data.root=.* failed: Error downloading"
    ):
        ImageDataModule(source="fashion_mnist", root=str(typo), channels=1, download=True).setup()
    assert not (tmp_path / "nonexistent").exists()


def test_generate_names_the_input_key(trained_run: Path, tmp_path: Path) -> None:
    from cvae.generation import generate

    cfg = compose_tool(
        "generate",
        tmp_path,
        f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
        "mode=reconstruct",
        f"input={tmp_path / 'nope'}",
        "device=cpu",
    )
    with pytest.raises(FileNotFoundError, match=f"^input={tmp_path / 'nope'} does not exist$"):
        generate(cfg)


# --- full disks ------------------------------------------------------------------------------
def test_a_full_disk_during_the_cache_build_leaves_nothing_and_keeps_the_old_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images, caches = tmp_path / "images", tmp_path / "cache"
    write_mixed_images(images, 8)
    ImageDataModule(root=str(images), image_size=16, cache_dir=str(caches)).setup()
    old = sorted(caches.iterdir())
    write_mixed_images(images / "more", 4)  # a changed folder: a new entry to build

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache.os, "pwrite", full)
    with pytest.raises(
        OSError,
        match=rf"cannot build the decoded-image cache in data.cache_dir={caches}: "
        r"no space left \(\d+ KiB needed, [\d.]+ \w+ free\)",
    ):
        ImageDataModule(root=str(images), image_size=16, cache_dir=str(caches)).setup()
    assert sorted(caches.iterdir()) == old  # no .partial, no .lock; the old entry whole
    monkeypatch.undo()
    monkeypatch.setattr(cache.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    with pytest.raises(OSError, match=r"no space left \(144 KiB needed, 1000 B free\)"):
        ImageDataModule(root=str(images), image_size=64, cache_dir=str(caches)).setup()
    assert sorted(caches.iterdir()) == old


@pytest.mark.slow
@pytest.mark.parametrize("saves_that_fit", [0, 2])
def test_a_full_disk_while_saving_a_checkpoint_names_the_cause_and_keeps_the_previous_one(
    saves_that_fit: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvae import checkpointing

    saves, real = [], shutil.disk_usage

    def filling_up(path):
        usage = real(path)
        if Path(path).name != "checkpoints":  # the data cache has room
            return usage
        saves.append(path)
        if len(saves) > saves_that_fit:  # then the disk is full
            return usage._replace(free=1000)
        return usage

    monkeypatch.setattr(checkpointing.shutil, "disk_usage", filling_up)
    left = "the previous checkpoint there is intact" if saves_that_fit else "no checkpoint was"
    with pytest.raises(OSError) as error:
        train(compose_train(tmp_path, *LONG_RUN))
    assert re.fullmatch(
        r"cannot write checkpoint \S*last.ckpt: no space left on the device \(it needs "
        rf"\d+ KiB, 1000 B free\); {left}.*",
        str(error.value),
    )
    folder = tmp_path / "checkpoints"
    kept = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    assert kept == (["last.ckpt"] if saves_that_fit else [])  # no temporary file left
    if saves_that_fit:
        assert load_checkpoint(folder / "last.ckpt")["global_step"] == 4


# --- start-up --------------------------------------------------------------------------------
def test_import_cvae_and_help_do_not_import_lightning() -> None:
    code = (
        "import sys, cvae, cvae.summarize, cvae.train, cvae.evaluate, cvae.generate, "
        "cvae.export, cvae.dashboard; "
        "print(sorted(m for m in ('lightning', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("config", "overrides", "line"),
    [
        (
            "train",
            ["trainer.max_epoch=1"],
            "trainer.max_epoch is not a key: did you mean "
            "trainer.max_epochs? (python -m cvae.train --cfg job lists them)",
        ),
        ("train", ["max_epochs=1"], "max_epochs is not a key: did you mean trainer.max_epochs?"),
        ("train", ["model=hvae", "model.latent=8"], "did you mean model.latent_dim?"),  # its keys
        (
            "train",
            ["model.beta=1,2", "model.latnt_dim=8,16"],
            "model.latent_dim?",
        ),
        (
            "train",
            ["model=cvaee"],
            "model=cvaee is not an option of model: did you mean "
            "model=cvae? (convhvae, cvae, cvae_deep, cvae_maxpool, deep_hvae, hvae, hvae_maps, "
            "vae_2conv)",
        ),
        ("train", ["model/prior=mogg"], "did you mean model/prior=mog?"),
        ("train", ["+trainer.max_epochs=1"], "trainer.max_epochs is a key already, set it without"),
        ("eval", ["eval.iw_sample=5"], "did you mean eval.iw_samples? (python -m cvae.evaluate"),
        ("generate", ["modee=sample"], "modee is not a key: did you mean mode?"),
        ("train", ["trainer.max_epochs=[1"], "trainer.max_epochs=[1 is not an override Hydra can"),
        ("train", ["model=hvae", "trainer.max_epochs=1", "~callbacks.image_logger"], None),
    ],
)
def test_a_mistyped_key_or_option_gets_its_close_matches(
    config: str, overrides: list[str], line: str | None
) -> None:
    from cvae.errors import bad_override

    said = bad_override(config, overrides)
    assert said == line if line is None else line in said


@pytest.mark.slow
def test_a_mistyped_key_is_one_line_instead_of_hydras_advice_to_add_it(tmp_path: Path) -> None:
    for door, typed in (
        ("train", "trainer.max_epoch=1"),
        ("generate", "ckpt_path=x modee=reconstruct"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", f"cvae.{door}", *typed.split(), f"hydra.run.dir={tmp_path}"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stderr.startswith("error: ") and "did you mean " in result.stderr
        assert "+" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
        assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing made


@pytest.mark.parametrize("in_a_job", [False, True])
def test_lightnings_srun_advice_only_inside_a_slurm_job(
    in_a_job: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine with SLURM installed (an `srun` on PATH) but outside a job: no advice to
    prepend `srun`; inside an allocation whose script did not use it, the advice stays."""
    import warnings

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from cvae.quiet import quiet_known_noise

    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    if in_a_job:
        monkeypatch.setenv("SLURM_JOB_ID", "42")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_noise()
        SLURMEnvironment.detect()
    advice = [w for w in caught if "`srun` command is available" in str(w.message)]
    assert len(advice) == in_a_job


def test_resume_command_quotes_what_the_shell_would_split(tmp_path: Path) -> None:
    from cvae.training import resume_command

    cfg = compose_train(tmp_path)
    command = resume_command(cfg, tmp_path / "a b" / "last.ckpt")
    assert shlex.split(command)[-1] == f"ckpt_path={tmp_path / 'a b' / 'last.ckpt'}"


def test_resuming_another_model_is_one_line_naming_what_differs(
    trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    last = trained_run / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit):
        run_or_report(train, compose_train(tmp_path, f"ckpt_path={last}", "model.latent_dim=4"))
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"error: ckpt_path={last} was written by another model (")
    assert "model.latent_dim: 8 there, 4 here" in line and "\n" not in line


def test_make_notebook_runs_as_root_too() -> None:
    # JupyterLab refuses to start as root without --allow-root; `make train` installs with
    # apt as root, so a new user may well be root.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}  # not make's child
    printed = subprocess.run(
        ["make", "--no-print-directory", "-n", "notebook"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    printed = printed.stdout
    (command,) = [line for line in printed.splitlines() if "jupyter lab notebooks/" in line]
    assert command.endswith("--allow-root") == (os.getuid() == 0)
