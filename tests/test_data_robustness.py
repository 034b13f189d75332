"""Real folders are messy: every odd file is decoded correctly or skipped and counted."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cvae.data import ImageDataModule, Preprocess, open_image
from cvae.data.decode import ImageDecodeError
from cvae.errors import _remove_empty_parents
from tests.helpers import TINY, write_broken_files, write_mixed_images

LOGGER = "cvae.data.datamodule"
REPO = Path(__file__).resolve().parents[1]


def _train_cli(outputs: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m cvae.train` with the tiny settings and `outputs` as the outputs root."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "cvae.train", *TINY, f"paths.log_dir={outputs}", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tree(folder: Path) -> list[str]:
    """Every path under `folder`, relative: what a failed run must leave unchanged."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# --- broken files are skipped, counted and named ----------------------------------------------
@pytest.mark.parametrize(
    "kind", ["zero_bytes", "truncated", "not_an_image", "decompression_bomb", "unreadable"]
)
def test_each_kind_of_broken_file_fails_to_decode_naming_it(tmp_path: Path, kind: str) -> None:
    path = write_broken_files(tmp_path)[kind]
    with pytest.raises(ImageDecodeError, match=f"cannot decode image file .*{path.name}"):
        Preprocess(image_size=8).load(path)


@pytest.mark.parametrize("cache", [True, False])
def test_broken_files_are_skipped_with_one_warning_that_counts_them(
    tmp_path: Path, cache: bool, caplog: pytest.LogCaptureFixture
) -> None:
    write_mixed_images(tmp_path / "images", 7)
    broken = write_broken_files(tmp_path / "images" / "sub")
    dm = ImageDataModule(
        root=str(tmp_path / "images"),
        image_size=8,
        batch_size=64,
        val_fraction=0,
        test_fraction=0,
        cache=cache,
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        dm.setup()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "5 of 12 files could not be decoded" in warnings[0]
    assert "7 images used, 5 skipped" in warnings[0]
    for path in broken.values():
        assert f"sub/{path.name}" in warnings[0]
    assert dm.num_images == 7 and len(dm.skipped) == 5
    images, _ = next(iter(dm.train_dataloader()))
    assert len(images) == 7  # one full epoch, no broken file reached the loader


def test_strict_turns_the_warning_into_an_error(tmp_path: Path) -> None:
    write_mixed_images(tmp_path, 3)
    write_broken_files(tmp_path)
    dm = ImageDataModule(root=str(tmp_path), image_size=8, strict=True)
    with pytest.raises(ValueError, match="data.strict=true: .*5 of 8 files could not be decoded"):
        dm.setup()


def test_a_folder_of_only_broken_files_is_an_error_naming_root(tmp_path: Path) -> None:
    write_broken_files(tmp_path)
    dm = ImageDataModule(root=str(tmp_path), image_size=8)
    with pytest.raises(ValueError, match=f"no usable images: data.root={tmp_path}: 5 of 5"):
        dm.setup()


def test_the_warning_names_only_the_first_few(tmp_path: Path, caplog) -> None:
    write_mixed_images(tmp_path, 2)
    for i in range(9):
        (tmp_path / f"bad_{i}.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ImageDataModule(root=str(tmp_path), image_size=8, val_fraction=0, test_fraction=0).setup()
    (message,) = [r.getMessage() for r in caplog.records]
    assert "9 of 11 files" in message and "and 4 more" in message
    assert len(re.findall(r"bad_\d\.png \(", message)) == 5


# --- odd but valid files are decoded correctly -----------------------------------------------
def _load(path: Path, **settings: object) -> np.ndarray:
    return Preprocess(**{"image_size": 8, **settings}).load(path)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_the_configured_background(tmp_path: Path, mode: str) -> None:
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[:, :4] = (255, 255, 255, 0)  # invisible white on the left
    pixels[:, 4:] = (90, 90, 90, 255)  # opaque grey on the right
    Image.fromarray(pixels, "RGBA").convert(mode).save(tmp_path / "alpha.png")
    black = _load(tmp_path / "alpha.png")
    assert np.all(black[:, :, :3] == 0) and np.all(black[:, :, 5:] == 90)
    red = _load(tmp_path / "alpha.png", background=[255, 0, 0])
    assert red[:, :, :3].reshape(3, -1).mean(axis=1).tolist() == [255, 0, 0]
    grey = _load(tmp_path / "alpha.png", channels=1, background=128)
    assert np.all(grey[:, :, :3] == 128)


def test_palette_transparency_becomes_background(tmp_path: Path) -> None:
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 255, 255, 0, 0, 255] + [0] * 762)
    image.paste(1, (4, 0, 8, 8))  # right half: blue; left half: palette 0, transparent
    image.save(tmp_path / "palette.png", transparency=0)
    x = _load(tmp_path / "palette.png")
    assert np.all(x[:, :, :3] == 0)
    assert x[:, :, 5:].reshape(3, -1).mean(axis=1).tolist() == [0, 0, 255]


def test_cmyk_jpeg_keeps_its_colour(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16), (220, 30, 30)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    colour = _load(tmp_path / "cmyk.jpg").reshape(3, -1).mean(axis=1)
    assert np.allclose(colour, [220, 30, 30], atol=8)


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 16384, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert _load(tmp_path / "deep.png", channels=1).mean() == pytest.approx(64, abs=1)


def test_float_tiff_in_unit_range_is_scaled_to_eight_bit(tmp_path: Path) -> None:
    """Mode F used to go through Pillow's clipping conversion: [0, 1] came out black."""
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert np.all(_load(tmp_path / "float.tif", channels=1) == 128)
    assert np.all(_load(tmp_path / "float.tif") == 128)  # grey in all three channels


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (
            np.full((8, 8), 300.0, dtype=np.float32),
            r"float image \(mode F\) with values in \[300, 300\], outside \[0, 1\]",
        ),
        (
            np.full((8, 8), np.nan, dtype=np.float32),
            r"float image \(mode F\) holds NaN or infinite values",
        ),
        (
            np.full((8, 8), 70_000, dtype=np.int32),
            r"32-bit integer image \(mode I\) with values in \[70000, 70000\], outside 0-65535",
        ),
        (
            np.full((8, 8), -5, dtype=np.int32),
            r"32-bit integer image \(mode I\) with values in \[-5, -5\], outside 0-65535",
        ),
    ],
    ids=["float_300", "float_nan", "int_70000", "int_negative"],
)
def test_float_or_wide_integer_tiff_out_of_range_is_refused_naming_it(
    tmp_path: Path, array: np.ndarray, message: str
) -> None:
    """Out of range used to be silently black (floats) or white (integers above 65535)."""
    Image.fromarray(array).save(tmp_path / "deep.tif")
    with pytest.raises(ImageDecodeError, match=f"cannot decode image file .*deep.tif: {message}"):
        _load(tmp_path / "deep.tif")


def test_integer_tiff_within_sixteen_bits_is_scaled_as_before(tmp_path: Path) -> None:
    Image.fromarray(np.full((8, 8), 16384, dtype=np.int32)).save(tmp_path / "deep.tif")
    Image.fromarray(np.full((8, 8), 200, dtype=np.int32)).save(tmp_path / "byte.tif")
    assert Image.open(tmp_path / "deep.tif").mode == "I"
    assert _load(tmp_path / "deep.tif", channels=1).mean() == pytest.approx(64, abs=1)
    assert np.all(_load(tmp_path / "byte.tif", channels=1) == 200)


def test_a_refused_tiff_is_skipped_and_named_in_the_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_mixed_images(tmp_path, 3)
    Image.fromarray(np.full((8, 8), 2.0, dtype=np.float32)).save(tmp_path / "depth.tif")
    dm = ImageDataModule(root=str(tmp_path), image_size=8, val_fraction=0, test_fraction=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dm.setup()
    (message,) = [r.getMessage() for r in caplog.records]
    assert (
        "1 of 4 files could not be decoded: depth.tif (float image (mode F) with values in "
        "[2, 2], outside [0, 1]"
    ) in message
    assert "3 images used, 1 skipped" in message


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    pixels = np.zeros((16, 32), dtype=np.uint8)
    pixels[:, :16] = 255  # stored: white left half, black right half
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise: white on top
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    x = _load(tmp_path / "rotated.jpg", image_size=16, channels=1)[0]
    assert x[:3].mean() > 200 and x[-3:].mean() < 55


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    colour = _load(tmp_path / "anim.gif").reshape(3, -1).mean(axis=1)
    assert np.allclose(colour, [255, 0, 0], atol=2)


def test_progressive_jpeg_decodes_like_a_baseline_one(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).resize((96, 120))
    image.save(tmp_path / "baseline.jpg", quality=95)
    image.save(tmp_path / "progressive.jpg", quality=95, progressive=True)
    assert Image.open(tmp_path / "progressive.jpg").info.get("progressive")
    a, b = (_load(tmp_path / f"{n}.jpg", image_size=32) for n in ("baseline", "progressive"))
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2


def test_draft_decoding_matches_a_full_decode(tmp_path: Path) -> None:
    """The reduced-scale JPEG decode differs from decoding in full by a few levels at most."""
    pixels = np.random.default_rng(1).integers(0, 256, (28, 22, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((178, 218), Image.BICUBIC).save(tmp_path / "face.jpg")
    preprocess = Preprocess(image_size=64, crop_size=148)
    drafted = preprocess.load(tmp_path / "face.jpg")
    full = preprocess(open_image(tmp_path / "face.jpg"))
    assert drafted.shape == full.shape == (3, 64, 64)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3


@pytest.mark.parametrize("size", [(1, 1), (3, 1000), (1000, 3), (2, 5)])
def test_tiny_and_elongated_images_become_full_squares(tmp_path: Path, size) -> None:
    Image.new("RGB", size, (10, 200, 30)).save(tmp_path / "odd.png")
    x = _load(tmp_path / "odd.png", image_size=16)
    assert x.shape == (3, 16, 16)
    assert x.reshape(3, -1).min(axis=1).tolist() == [10, 200, 30]


def test_upper_case_extensions_are_decoded(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "SHOUT.JPEG", "JPEG")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "LOUD.PNG", "PNG")
    dm = ImageDataModule(root=str(tmp_path), image_size=8, val_fraction=0, test_fraction=0)
    dm.setup()
    assert dm.num_images == 2 and dm.skipped == []


# --- a run that fails on bad input leaves nothing on disk -------------------------------------
@pytest.mark.slow
def test_a_mistyped_objective_leaves_no_empty_run_parents(tmp_path: Path) -> None:
    """The husk removal removed the run folder but left `outputs/train/runs/` behind."""
    outputs = tmp_path / "outputs"
    (outputs / "eval" / "2026-01-01_00-00-00").mkdir(parents=True)  # another task's: kept
    result = _train_cli(outputs, "objective.metric=val/typo")
    assert result.returncode == 1, result.stderr[-3000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: objective.metric='val/typo' is not logged by this run: one of val/neg_elbo"
        )
    )
    assert _tree(outputs) == ["eval", "eval/2026-01-01_00-00-00"]


@pytest.mark.slow
def test_a_data_folder_with_no_image_leaves_no_run_folder_and_no_cache(tmp_path: Path) -> None:
    """It used to fail in `setup`, after the config tree and TensorBoard events were written:
    the run folder stayed (listed by TensorBoard), and so did `.cvae-cache/` in the data."""
    root, outputs = tmp_path / "images", tmp_path / "outputs"
    root.mkdir()
    outputs.mkdir()
    (root / "notes.png").write_text("a text file named like an image")
    result = _train_cli(outputs, "data=folder", f"data.root={root}")
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no usable images: data.root={root}: 1 of 1 files could not be decoded: "
        f"notes.png (cannot identify image file '{root / 'notes.png'}')"
    )
    assert _tree(outputs) == [] and _tree(root) == ["notes.png"]


def test_empty_parents_are_removed_up_to_the_root_and_no_further(tmp_path: Path) -> None:
    root = tmp_path / "outputs"
    (root / "train" / "runs" / "older").mkdir(parents=True)  # a parent that holds a run
    (root / "eval" / "runs" / "now").mkdir(parents=True)
    _remove_empty_parents(root / "train" / "runs" / "now", root)
    _remove_empty_parents(root / "eval" / "runs" / "now" / "gone", root)
    assert _tree(root) == ["train", "train/runs", "train/runs/older"]
    _remove_empty_parents(root / "train" / "runs" / "older" / "gone", root)
    assert _tree(root) == [] and root.is_dir()  # the outputs root itself stays
    outside = tmp_path / "elsewhere" / "run"
    outside.mkdir(parents=True)
    _remove_empty_parents(outside / "gone", root)  # not under the root: nothing touched
    assert outside.is_dir()
