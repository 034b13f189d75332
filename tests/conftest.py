"""Shared fixtures: tiny configs, generated image folders and one trained checkpoint."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs a worker per core: one torch thread each (and in the commands the
    # tests start, through the environment), so the workers do not fight over the cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# Small and fast: 16x16 synthetic shapes, a two-block model, one epoch, no progress bar.
TINY = [
    "data=synthetic",
    "data.image_size=16",
    "data.synthetic_images=64",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.latent_dim=8",
    "model.hidden_channels=[8,16]",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
]


def compose_config(output_dir: Path, *overrides: str) -> DictConfig:
    """The training config as `python -m cvae.train` composes it, writing into `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def compose_train(output_dir: Path, *overrides: str) -> DictConfig:
    """The same with the tiny settings: seconds per run."""
    return compose_config(output_dir, *TINY, *overrides)


def write_mixed_images(folder: Path, count: int = 6, seed: int = 0) -> list[Path]:
    """JPEG and PNG files of assorted modes and sizes: what a real folder looks like."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("CMYK", "JPEG"),
             ("RGB", "PNG")]  # fmt: skip
    paths = []
    for i in range(count):
        mode, ext = kinds[i % len(kinds)]
        width, height = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(array, "RGB")
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        path = folder / f"image_{i}.{ext}"
        image.save(path)
        paths.append(path)
    return paths


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims `width` x `height`: a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    data[12:29] = header
    data[29:33] = zlib.crc32(header).to_bytes(4, "big")
    return bytes(data)


def write_broken_files(folder: Path) -> dict[str, Path]:
    """One file of each kind that a real folder holds and no decoder can read."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        good, "JPEG"
    )
    files = {
        "zero_bytes": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
        "not_an_image": folder / "notes.png",
        "decompression_bomb": folder / "bomb.png",
        "unreadable": folder / "dangling.jpg",
    }
    files["zero_bytes"].write_bytes(b"")
    files["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files["not_an_image"].write_text("a text file named like an image")
    files["decompression_bomb"].write_bytes(_png_claiming_size(30_000, 30_000))
    files["unreadable"].symlink_to(folder / "no_such_file.jpg")
    return files


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
    from cvae.runtime import train

    run_dir = tmp_path_factory.mktemp("trained_run")
    train(compose_train(run_dir, "trainer.max_epochs=2", "test=false"))
    return run_dir


def compose_tool(name: str, output_dir: Path, *overrides: str) -> DictConfig:
    """The config of `python -m cvae.<evaluate|generate|export>` (config `eval`, ...)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[f"paths.output_dir={output_dir}", *overrides])
