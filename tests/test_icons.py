"""The colour preset `data=icons`: the Oxygen icon theme's 64x64 PNGs (Debian package
oxygen-icon-theme, installed by `make icons`), read in place with their category folders as
classes. Every test runs on a small tree of the same layout under tmp_path; where the package
is installed, the preset's loading test runs on the real icons as well. A missing package is
a one-line error naming the folder and `make icons`; `cvae.train_features` trains on such a
colour class folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from cvae import unit_range
from cvae.errors import run_or_report
from cvae.features import run
from cvae.fid import feature_network
from tests.helpers import REPO, TINY_CLASSIFIER, compose_tool

PRESET_ROOT = Path("/usr/share/icons/oxygen/base/64x64")
CATEGORIES = ["actions", "apps", "devices", "mimetypes", "places", "status"]
# A folder inside the package's that no version of it has: missing whether or not it is installed.
MISSING_ROOT = PRESET_ROOT.parent / "7x7"


def write_icon_tree(root: Path, per_class: int = 4) -> Path:
    """`root/oxygen/base/64x64/<category>/*.png` as the package lays it out: RGBA icons (a
    coloured disc on a transparent ground), one of them 22x22 as a few of Oxygen's are, and
    a link to an icon of another category (counted once, as the package's links are)."""
    tree = root / "oxygen" / "base" / "64x64"
    rng = np.random.default_rng(0)
    for index, category in enumerate(CATEGORIES):
        folder = tree / category
        folder.mkdir(parents=True)
        for i in range(per_class):
            size = 22 if (index, i) == (0, 0) else 64
            icon = np.zeros((size, size, 4), np.uint8)
            y, x = np.mgrid[:size, :size]
            disc = (y - size / 2) ** 2 + (x - size / 2) ** 2 < (size / 3) ** 2
            icon[disc] = [*rng.integers(0, 200, 3), 255]
            Image.fromarray(icon, "RGBA").save(folder / f"icon-{i}.png")
    (tree / "mimetypes" / "alias.png").symlink_to(tree / "apps" / "icon-0.png")
    return tree


@pytest.fixture
def icon_tree(tmp_path: Path) -> Path:
    return write_icon_tree(tmp_path / "icons")


def compose_icons(tmp_path: Path, *overrides: str):
    """The training config with `data=icons`, its cache under tmp_path."""
    return compose_tool(
        "train",
        tmp_path / "out",
        "data=icons",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.num_workers=0",
        *overrides,
    )


def test_the_preset_reads_the_package_folder_in_colour_on_white(tmp_path: Path) -> None:
    data = compose_icons(tmp_path).data
    assert data.source == "folder" and Path(data.root) == PRESET_ROOT
    assert data.channels == 3 and data.image_size == 64
    assert list(data.background) == [255, 255, 255]
    default_cache = compose_tool("train", tmp_path / "out", "data=icons").data.cache_dir
    assert Path(default_cache) == Path("data/.cvae-cache")  # not inside the system's folder


def _roots(icon_tree: Path) -> list[tuple[Path, list[str], int]]:
    """(root, classes, distinct icons): the tree always, the installed package where it is."""
    roots = [(icon_tree, CATEGORIES, len(CATEGORIES) * 4)]
    if PRESET_ROOT.is_dir():
        categories = sorted(p.name for p in PRESET_ROOT.iterdir() if p.is_dir())
        roots.append((PRESET_ROOT, categories, 500))  # 590 in version 5.103
    return roots


def test_the_categories_are_the_classes_and_images_are_colour_64px(
    tmp_path: Path, icon_tree: Path
) -> None:
    for root, classes, count in _roots(icon_tree):
        datamodule = instantiate(compose_icons(tmp_path, f"data.root={root}").data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        datamodule.setup("test")
        assert datamodule.class_names == classes
        sizes = [len(s) for s in (datamodule.train_set, datamodule.val_set, datamodule.test_set)]
        assert sum(sizes) >= count and min(sizes) >= 1, (root, sizes)
        if root == icon_tree:
            assert sum(sizes) == count  # the link is not a second icon
        images, labels = next(iter(datamodule.train_dataloader()))
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 64, 64)
        unit = unit_range(images)  # what the model trains on
        assert unit.dtype == torch.float32 and unit.min() >= 0 and unit.max() <= 1
        assert unit.std() > 0.1  # colour icons, not a blank page
        assert ((labels >= 0) & (labels < len(classes))).all()
        # transparency is white: the corners of every (centred) icon
        assert (images[:, :, 0, 0] == 255).float().mean() > 0.9, root


def test_a_missing_package_is_one_line_naming_the_folder_and_make_icons(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    missing = [MISSING_ROOT] + ([] if PRESET_ROOT.is_dir() else [PRESET_ROOT])
    for root in missing:
        cfg = compose_tool(
            "train_features", tmp_path / "out", "data=icons", f"data.root={root}", "progress=false"
        )
        with pytest.raises(SystemExit) as exit_status:
            run_or_report(run, cfg)
        assert exit_status.value.code == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [
            f"error: data.root={root} does not exist: install the icon theme with "
            "`make icons` (Debian package oxygen-icon-theme)"
        ]


@pytest.mark.slow
def test_the_training_command_without_the_package_says_so_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cvae.train", "data=icons", f"data.root={MISSING_ROOT}"],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: data.root={MISSING_ROOT} does not exist: install the icon theme with "
        "`make icons` (Debian package oxygen-icon-theme)"
    ]


def test_train_features_on_a_colour_class_folder(tmp_path: Path, icon_tree: Path) -> None:
    result = run(
        compose_tool(
            "train_features",
            tmp_path / "out",
            "data=icons",
            f"data.root={icon_tree}",
            f"data.cache_dir={tmp_path / 'cache'}",
            *TINY_CLASSIFIER,
            "data.batch_size=8",
        )
    )
    path = tmp_path / "out" / "features.pt"
    assert result["path"] == str(path) and result["channels"] == 3
    assert result["classes"] == CATEGORIES
    network = feature_network(path, key="features.pt")
    with torch.inference_mode():
        for size in (16, 64):  # the data's size and the preset's
            features = network(torch.rand(5, 3, size, size))
            assert features.shape == (5, 16) and torch.isfinite(features).all()


def test_the_white_background_is_saved_as_plain_ints(tmp_path: Path, icon_tree: Path) -> None:
    """Hydra hands `[255, 255, 255]` over as a ListConfig; a checkpoint holding one would not
    load with `weights_only=True` (the end-of-training sampler fit and every tool load so)."""
    datamodule = instantiate(compose_icons(tmp_path, f"data.root={icon_tree}").data)
    background = datamodule.hparams.background
    assert type(background) is list and all(type(value) is int for value in background)
    torch.save({"datamodule_hyper_parameters": dict(datamodule.hparams)}, tmp_path / "h.pt")
    loaded = torch.load(tmp_path / "h.pt", weights_only=True)
    assert loaded["datamodule_hyper_parameters"]["background"] == [255, 255, 255]
