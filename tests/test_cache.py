"""The decoded-image cache: built once, read after, rebuilt when anything changes or breaks."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cvae.data import ImageDataModule
from cvae.data.cache import decode_source
from cvae.data.datamodule import DeviceBatches, EpochSampler
from cvae.data.decode import Preprocess
from cvae.data.presets import FileDataset
from tests.helpers import write_broken_files, write_mixed_images

REPO = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where on_device puts the data


def _datamodule(root: Path, **settings: object) -> ImageDataModule:
    options = {"image_size": 8, "batch_size": 64, "val_fraction": 0.25, "test_fraction": 0}
    dm = ImageDataModule(root=str(root), **{**options, **settings})
    dm.setup()
    return dm


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".cvae-cache").glob("*.npy"))


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise AssertionError("decoded a file although the cache holds it")

    monkeypatch.setattr(FileDataset, "decode", refuse)


def test_first_use_builds_the_cache_and_later_runs_only_read_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_mixed_images(tmp_path, 12)
    first = _datamodule(tmp_path)
    assert len(_entries(tmp_path)) == 1 and len(first.train_set) == 9
    assert isinstance(first.train_set.images, np.memmap)  # read from disk, not a copy
    _forbid_decoding(monkeypatch)
    second = _datamodule(tmp_path)
    for a, b in zip(first.val_dataloader(), second.val_dataloader(), strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_cached_batches_equal_decoding_each_epoch(tmp_path: Path) -> None:
    write_mixed_images(tmp_path, 12)
    cached, plain = _datamodule(tmp_path), _datamodule(tmp_path, cache=False)
    (a_images, a_labels), (b_images, b_labels) = (
        next(iter(dm.val_dataloader())) for dm in (cached, plain)
    )
    assert a_images.dtype == b_images.dtype == torch.uint8
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


def test_a_changed_folder_or_setting_rebuilds_and_an_unchanged_one_never_does(
    tmp_path: Path,
) -> None:
    files = write_mixed_images(tmp_path, 8)
    _datamodule(tmp_path)
    _datamodule(tmp_path)
    assert len(_entries(tmp_path)) == 1
    os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 10**9))  # touched
    _datamodule(tmp_path)
    assert len(_entries(tmp_path)) == 2
    write_mixed_images(tmp_path / "more", 2, seed=5)  # a new file
    assert len(_datamodule(tmp_path).train_set) == 8
    _datamodule(tmp_path, image_size=4)
    _datamodule(tmp_path, crop_size=10)
    assert len(_entries(tmp_path)) == 5


def test_half_written_entries_are_rebuilt_never_read(tmp_path: Path) -> None:
    write_mixed_images(tmp_path, 8)
    reference = _datamodule(tmp_path).val_set
    (entry,) = (tmp_path / ".cvae-cache").glob("*.npy")
    manifest = entry.with_suffix(".json")
    expected = np.array(reference.images)

    def rebuilt() -> np.ndarray:
        return np.array(_datamodule(tmp_path).val_set.images)

    manifest.unlink()  # killed after the array, before the manifest
    assert np.array_equal(rebuilt(), expected)
    entry.write_bytes(entry.read_bytes()[:200])  # truncated array, manifest still there
    assert np.array_equal(rebuilt(), expected)
    np.save(entry, np.zeros_like(expected[:3]))  # an array of the wrong shape
    assert np.array_equal(rebuilt(), expected)


KILLED_BUILD = """
import sys, time
from cvae.data import ImageDataModule
from cvae.data.decode import Preprocess
slow_load = Preprocess.load
def load(self, path):
    time.sleep(0.1)
    return slow_load(self, path)
Preprocess.load = load
ImageDataModule(root=sys.argv[1], image_size=8, cache_workers=1).setup()
"""


@pytest.mark.slow
def test_a_build_killed_mid_way_leaves_nothing_that_is_read(tmp_path: Path) -> None:
    write_mixed_images(tmp_path, 300)
    process = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(tmp_path)], cwd=REPO)
    cache = tmp_path / ".cvae-cache"
    deadline = time.monotonic() + 120
    while not list(cache.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # well into the decoding
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert list(cache.glob("*.partial")) and not list(cache.glob("*.json"))
    dm = _datamodule(tmp_path, val_fraction=0.1)
    assert dm.num_images == 300 and not list(cache.glob("*.partial"))
    plain = _datamodule(tmp_path, val_fraction=0.1, cache=False)
    for a, b in zip(dm.val_dataloader(), plain.val_dataloader(), strict=True):
        assert torch.equal(a[0], b[0])


def test_unusable_cache_dir_is_an_error_naming_the_key(tmp_path: Path) -> None:
    write_mixed_images(tmp_path / "images", 3)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    dm = ImageDataModule(root=str(tmp_path / "images"), cache_dir=str(blocker / "cache"))
    with pytest.raises(OSError, match=f"data.cache_dir={blocker / 'cache'} cannot be created"):
        dm.setup()


def test_scan_without_cache_keeps_no_pixels(tmp_path: Path) -> None:
    files = write_mixed_images(tmp_path, 4)
    source = FileDataset(tmp_path, files, [-1] * 4)
    decoded = decode_source(source, Preprocess(8), tmp_path / "c", workers=2, with_images=False)
    assert decoded.images is None and decoded.valid.tolist() == [0, 1, 2, 3]
    assert not list((tmp_path / "c").glob("*.npy"))


# --- a folder with nothing usable adds nothing to it ------------------------------------------
def test_an_empty_data_folder_gets_no_cache_folder(tmp_path: Path) -> None:
    """The writability probe used to leave `.cvae-cache/` in the user's folder."""
    dm = ImageDataModule(root=str(tmp_path), image_size=8)
    with pytest.raises(FileNotFoundError, match=f"^data.root={tmp_path} holds no image files"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cache", [True, False])
def test_a_folder_of_only_a_non_image_fails_in_prepare_data_keeping_nothing(
    tmp_path: Path, cache: bool
) -> None:
    """Failing in `prepare_data`, before training writes its config tree and events; the
    cache entry (of every file skipped) used to stay in the data folder."""
    (tmp_path / "notes.png").write_text("a text file named like an image")
    dm = ImageDataModule(root=str(tmp_path), image_size=8, cache=cache)
    message = (
        f"no usable images: data.root={tmp_path}: 1 of 1 files could not be decoded: "
        f"notes.png (cannot identify image file '{tmp_path / 'notes.png'}')"
    )
    with pytest.raises(ValueError) as raised:
        dm.prepare_data()
    assert str(raised.value) == message
    assert [path.name for path in tmp_path.iterdir()] == ["notes.png"]


def test_a_cache_dir_made_for_nothing_usable_is_removed(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    write_broken_files(tmp_path / "images")
    cache_dir = tmp_path / "made" / "for" / "it"
    dm = ImageDataModule(root=str(tmp_path / "images"), image_size=8, cache_dir=str(cache_dir))
    with pytest.raises(ValueError, match="no usable images: .* 5 of 5 files"):
        dm.prepare_data()
    assert [path.name for path in tmp_path.iterdir()] == ["images"]


def test_the_cache_log_counts_only_the_images_decoded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It said "decoded 8 images" of a folder of 3 images and 5 broken files."""
    write_mixed_images(tmp_path, 3)
    write_broken_files(tmp_path)
    source = FileDataset(tmp_path, sorted(p for p in tmp_path.iterdir() if p.suffix), [-1] * 8)
    with caplog.at_level(logging.INFO, logger="cvae.data.cache"):
        decoded = decode_source(source, Preprocess(8), tmp_path / "c", workers=2)
    assert len(decoded.valid) == 3
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith(f"decoded 3 images from data.root={tmp_path} in ")
    assert "; 5 skipped: not decodable) into " in message


# --- batches on the device -------------------------------------------------------------------
def test_on_device_batches_match_the_loader_and_cover_each_epoch(tmp_path: Path) -> None:
    write_mixed_images(tmp_path, 40)
    loader_dm = _datamodule(tmp_path, batch_size=8)
    device_dm = _datamodule(tmp_path, batch_size=8, on_device=True)
    batches = device_dm.train_dataloader()
    assert isinstance(batches, DeviceBatches) and len(batches) == 4
    for a, b in zip(loader_dm.val_dataloader(), device_dm.val_dataloader(), strict=True):
        assert b[0].device.type == DEVICE and b[0].dtype == torch.uint8
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    epochs = [torch.cat([images.flatten(1) for images, _ in batches]) for _ in range(2)]
    assert len(epochs[0]) == 30 and not torch.equal(epochs[0], epochs[1])  # reshuffled
    expected = torch.from_numpy(np.array(loader_dm.train_set.images)).flatten(1)
    expected = expected[torch.from_numpy(loader_dm.train_set.indices)]
    for epoch in epochs:  # every training image exactly once
        assert torch.equal(epoch.sort(0).values, expected.sort(0).values)


def test_ranks_take_equal_disjoint_shares_of_one_permutation() -> None:
    shares = []
    for rank in (0, 1):
        torch.manual_seed(0)  # every rank is seeded alike
        shares.append(list(EpochSampler(11, shuffle=True, rank=rank, world_size=2)))
    assert len(shares[0]) == len(shares[1]) == 5  # equal: the ranks step together
    assert not set(shares[0]) & set(shares[1])
    validation = [list(EpochSampler(11, shuffle=False, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(validation[0] + validation[1]) == list(range(11))  # nothing dropped


def test_the_order_depends_on_the_seed_not_on_what_was_drawn_before() -> None:
    """Jobs of a sweep over model sizes draw different amounts at initialisation."""
    torch.manual_seed(0)
    order = list(EpochSampler(20, shuffle=True))
    torch.manual_seed(0)
    torch.randn(1000)  # a bigger model's initial weights
    assert list(EpochSampler(20, shuffle=True)) == order
    torch.manual_seed(1)
    assert list(EpochSampler(20, shuffle=True)) != order


def test_sampler_orders_depend_on_the_epoch_and_resume_mid_epoch() -> None:
    torch.manual_seed(0)
    sampler = EpochSampler(20, shuffle=True)
    first, second = list(sampler), list(sampler)  # a plain loop: a new order per pass
    assert first != second and sorted(first) == sorted(second) == list(range(20))
    sampler.set_epoch(1)
    assert list(sampler) == second  # the order is a function of (seed, epoch)
    sampler.resume(epoch=1, done=8)
    sampler.set_epoch(1)
    assert list(sampler) == second[8:]  # once: the epoch after is whole again
    assert len(list(sampler)) == 20


def test_on_device_batches_follow_the_sampler() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    torch.manual_seed(0)
    sampler = EpochSampler(10, shuffle=True)
    order = list(sampler)
    sampler.set_epoch(0)
    batches = DeviceBatches(images, torch.arange(10), torch.arange(10), 4, sampler)
    assert len(batches) == 3
    assert torch.cat([labels for _, labels in batches]).tolist() == order


def test_on_device_needs_the_cache() -> None:
    with pytest.raises(ValueError, match="data.on_device=true needs data.cache=true"):
        ImageDataModule(source="synthetic", on_device=True, cache=False)
