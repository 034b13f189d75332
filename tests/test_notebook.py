"""The exploration notebook runs headless against a checkpoint trained here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cvae import ImageDataModule
from cvae.samplers import sampler_path
from cvae.training import train
from tests.helpers import compose_train, figures, run_notebook, text, write_mixed_images

pytestmark = pytest.mark.slow  # every test here runs real commands or trainings


def test_explore_checkpoint_notebook_runs(trained_run: Path) -> None:
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    outputs = run_notebook(checkpoint)
    # a batch, reconstructions, samples at two temperatures, two interpolations, a traversal,
    # the posterior means in 2-D and the training curves (no classes: unconditional)
    assert len(figures(outputs)) == 9
    datamodule = ImageDataModule.load_from_checkpoint(checkpoint)
    datamodule.setup("test")
    batch = min(datamodule.hparams.batch_size, len(datamodule.test_set))
    assert f"batch: ({batch}, 3, 16, 16)" in text(outputs)
    assert "principal direction 1 (" in text(outputs) and "active units:" in text(outputs)
    assert "unconditional checkpoint (model.conditional=false)" in text(outputs)
    assert "no classes in this data" not in text(outputs)  # shapes have classes: a colour bar


def test_without_a_path_the_newest_single_run_is_picked(tmp_path: Path) -> None:
    """`CKPT_PATH = None`: the newest outputs/*/runs/*/checkpoints/last.ckpt, never a sweep
    job's (outputs/*/multiruns/...), however recent."""
    paths = {}
    for age, name in enumerate(["train/runs/old", "eval/runs/new", "train/multiruns/s/0"]):
        path = tmp_path / "outputs" / name / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.touch()
        os.utime(path, (1_000_000 + age, 1_000_000 + age))
        paths[name] = path
    (tmp_path / "notebooks").mkdir()
    outputs = run_notebook(None, tmp_path / "notebooks", cells=3)  # up to picking the path
    assert f"checkpoint: {paths['eval/runs/new'].resolve()}" in text(outputs)
    assert "picked the newest run's checkpoint" in text(outputs)


def test_a_folder_without_classes_and_a_run_without_a_fit(tmp_path: Path) -> None:
    """Every label is -1: the posterior means are drawn in one colour, without a bar. The
    run's fit removed (a run stopped before it): the notebook fits the sampler and saves it."""
    folder = tmp_path / "flat"
    write_mixed_images(folder, 24)
    train(compose_train(tmp_path / "run", "data=folder", f"data.root={folder}", "test=false"))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    sampler_path(checkpoint, "gmm").unlink()
    outputs = run_notebook(checkpoint, cells=16)
    assert "no classes in this data: the points in one colour" in text(outputs)
    assert "samples from the fitted gmm: sampler=gmm (" in text(outputs)
    assert sampler_path(checkpoint, "gmm").is_file()
