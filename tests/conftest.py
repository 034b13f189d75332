"""Fixtures: the user cache folder, a generated image folder and one trained checkpoint
(the helpers they use, and that test modules share, are in `tests/helpers.py`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import LONG_RUN, compose_train, load_checkpoint, write_mixed_images

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: one torch thread each (and in the commands the
    # tests start, through the environment), so the workers do not fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Caches of root-less sources (synthetic) go here, for this process and its children."""
    folder = tmp_path_factory.mktemp("user_cache")
    os.environ["XDG_CACHE_HOME"] = str(folder)
    return folder


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Flat files at the top plus two class subfolders (one nested a level deeper)."""
    root = tmp_path / "images"
    write_mixed_images(root, 4, seed=1)
    write_mixed_images(root / "cats", 6, seed=2)
    write_mixed_images(root / "dogs" / "puppies", 6, seed=3)
    return root


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with checkpoints from two tiny epochs, shared by the tests that read it."""
    from cvae.training import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    train(compose_train(run_dir, "trainer.max_epochs=2", "test=false"))
    return run_dir


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The last.ckpt of the LONG_RUN trained without interruption (2 epochs of 7 steps): what
    the runs that are stopped and resumed must end with. Read it, never change it."""
    from cvae.training import train

    folder = tmp_path_factory.mktemp("whole")
    train(compose_train(folder, *LONG_RUN))
    return load_checkpoint(folder / "checkpoints" / "last.ckpt")
