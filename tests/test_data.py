"""The data wing: folder walk, decoding, sources, splits and batches."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cvae.data import ImageDataModule, Preprocess, SyntheticShapes, index_folder, presets, read_idx
from cvae.data.decode import ImageDecodeError
from cvae.errors import error_line, user_error
from cvae.viz import visualize_batch
from tests.helpers import write_mixed_images


# --- folder walk -----------------------------------------------------------------------------
def test_index_flat_folder_labels_minus_one(tmp_path: Path) -> None:
    write_mixed_images(tmp_path, 6)
    index = index_folder(tmp_path)
    assert len(index.files) == 6
    assert index.labels == [-1] * 6
    assert index.classes == []


def test_index_nested_folders_label_by_first_level(mixed_folder: Path) -> None:
    index = index_folder(mixed_folder)
    assert index.classes == ["cats", "dogs"]
    by_label = {label: index.labels.count(label) for label in set(index.labels)}
    assert by_label == {-1: 4, 0: 6, 1: 6}


def test_index_skips_hidden_and_non_images_and_symlink_loops(tmp_path: Path) -> None:
    write_mixed_images(tmp_path / "a", 2)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "a" / ".hidden.png").write_bytes((tmp_path / "a" / "image_1.png").read_bytes())
    (tmp_path / ".cache").mkdir()
    write_mixed_images(tmp_path / ".cache", 2)
    (tmp_path / "a" / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "b").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "folder.png").mkdir()  # a folder named like an image is not an image
    (tmp_path / "a" / "z_link.jpg").symlink_to(tmp_path / "a" / "image_0.jpg")  # same file
    index = index_folder(tmp_path)
    assert sorted(p.name for p in index.files) == ["image_0.jpg", "image_1.png"]


@pytest.mark.parametrize(
    "ext", ["jpg", "JPG", "jpeg", "png", "PNG", "bmp", "gif", "webp", "tif", "TIFF"]
)
def test_index_finds_every_common_extension(tmp_path: Path, ext: str) -> None:
    Image.new("RGB", (8, 8), "red").save(tmp_path / f"x.{ext}", format=_pil_format(ext))
    assert len(index_folder(tmp_path).files) == 1


def _pil_format(ext: str) -> str:
    return {"jpg": "JPEG", "tif": "TIFF"}.get(ext.lower(), ext.upper())


def test_bad_roots_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=f"data.root={missing} does not exist"):
        index_folder(missing)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="data.root=.*file.png is a file"):
        ImageDataModule(source="folder", root=str(a_file))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty holds no image files"):
        index_folder(tmp_path / "empty")


# --- decoding --------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_preprocess_any_mode_to_square_unit_range(mode: str, channels: int) -> None:
    image = Image.new("RGB", (50, 30), (200, 100, 50)).convert(mode)
    x = Preprocess(image_size=16, channels=channels)(image)
    assert x.shape == (channels, 16, 16)
    assert x.dtype == np.uint8
    assert x.flags.c_contiguous
    assert x.flags.writeable  # torch.from_numpy warns about read-only arrays


def test_preprocess_crops_center_and_keeps_16_bit_range() -> None:
    array = np.zeros((40, 40), dtype=np.uint8)
    array[10:30, 10:30] = 255  # a white square in the middle
    x = Preprocess(image_size=8, channels=1, crop_size=20)(Image.fromarray(array))
    assert np.all(x == 255)  # the crop kept only the square
    half = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid-grey at 16 bits
    assert Preprocess(image_size=8, channels=1)(half).mean() == pytest.approx(128, abs=1)


def test_preprocess_composites_alpha_on_black_and_keeps_colours() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:, :2] = (255, 255, 255, 0)  # hidden white: must come out black
    rgba[:, 2:] = (200, 100, 50, 255)  # opaque colour: must survive
    x = Preprocess(image_size=4, channels=3)(Image.fromarray(rgba, "RGBA"))
    assert np.all(x[:, :, :2] == 0)
    assert x[:, 0, 3].tolist() == [200, 100, 50]


@pytest.mark.parametrize("workers", [0, 1])
def test_file_broken_after_the_scan_names_itself_even_from_a_worker(
    tmp_path: Path, workers: int
) -> None:
    files = write_mixed_images(tmp_path, 3)
    dm = ImageDataModule(
        root=str(tmp_path),
        image_size=8,
        batch_size=8,
        val_fraction=0,
        test_fraction=0,
        cache=False,
        num_workers=workers,
    )
    dm.setup()
    files[0].write_bytes(b"not an image any more")  # changed while training
    with pytest.raises(ImageDecodeError) as caught:
        next(iter(dm.train_dataloader()))
    line = error_line(user_error(caught.value))
    assert "cannot decode image file" in line and files[0].name in line and "\n" not in line


# --- sources ---------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fake_mnist(folder: Path, compress: bool, train: int = 20, test: int = 10) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        _write_idx(
            folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), compress
        )
        _write_idx(folder / f"{split}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), compress)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_plain_and_gzipped(tmp_path: Path, compress: bool) -> None:
    write_fake_mnist(tmp_path, compress)
    suffix = ".gz" if compress else ""
    images = read_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    labels = read_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert images.shape == (20, 28, 28) and labels.shape == (20,)


def test_read_idx_rejects_truncated_file(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(path)


def test_fashion_mnist_from_root_then_system_folder_without_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_download(*args, **kwargs):
        raise AssertionError("must not download when files are present")

    monkeypatch.setattr(presets, "_torchvision_class", lambda source: no_download)
    write_fake_mnist(tmp_path / "root", compress=False)
    train, test = presets.load_idx_source("fashion_mnist", tmp_path / "root", download=True)
    assert (len(train), len(test)) == (20, 10)

    write_fake_mnist(tmp_path / "system", compress=True, train=30)
    monkeypatch.setattr(presets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    train, test = presets.load_idx_source("fashion_mnist", tmp_path / "empty", download=True)
    assert (len(train), len(test)) == (30, 10)
    assert train.image(0).size == (28, 28) and train.labels.dtype == np.int64


def test_download_is_the_last_resort_and_its_failure_is_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    calls = []

    class OfflineFashionMNIST:  # stands in for torchvision's class on a machine with no network
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(root)
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: no network")

    OfflineFashionMNIST.__name__ = "FashionMNIST"
    monkeypatch.setattr(presets, "_torchvision_class", lambda source: OfflineFashionMNIST)
    with pytest.raises(FileNotFoundError, match=r"download into data.root=.*root failed"):
        presets.load_idx_source("fashion_mnist", tmp_path / "root", download=True)
    assert calls == [str(tmp_path / "root")]
    with pytest.raises(FileNotFoundError, match="data.download=true"):
        presets.load_idx_source("fashion_mnist", tmp_path / "root", download=False)

    class DownloadingFashionMNIST(OfflineFashionMNIST):  # torchvision's layout after a download
        def __init__(self, root: str, train: bool, download: bool) -> None:
            write_fake_mnist(Path(root) / "FashionMNIST" / "raw", compress=False)

    DownloadingFashionMNIST.__name__ = "FashionMNIST"
    monkeypatch.setattr(presets, "_torchvision_class", lambda source: DownloadingFashionMNIST)
    train, _ = presets.load_idx_source("fashion_mnist", tmp_path / "root", download=True)
    assert len(train) == 20


def test_cifar10_offline_error_names_root(tmp_path: Path) -> None:
    dm = ImageDataModule(source="cifar10", root=str(tmp_path), download=False, num_workers=0)
    with pytest.raises(FileNotFoundError, match=f"cifar10: no dataset under data.root={tmp_path}"):
        dm.setup()


def test_synthetic_shapes_are_reproducible() -> None:
    a, b = SyntheticShapes(10, 16, seed=3), SyntheticShapes(10, 16, seed=3)
    assert all(np.array_equal(np.asarray(a.image(i)), np.asarray(b.image(i))) for i in range(10))
    assert np.array_equal(a.labels, b.labels) and set(a.labels.tolist()) <= {0, 1, 2}


# --- the data module -------------------------------------------------------------------------
def test_datamodule_on_generated_folder(mixed_folder: Path) -> None:
    dm = ImageDataModule(root=str(mixed_folder), image_size=16, batch_size=4, num_workers=0)
    dm.setup()
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {-1, 0, 1}
    sizes = (len(dm.train_set), len(dm.val_set), len(dm.test_set))
    assert sizes == (12, 2, 2)


def _split_items(dm: ImageDataModule) -> list[set[int]]:
    return [set(split.indices.tolist()) for split in (dm.train_set, dm.val_set, dm.test_set)]


def test_relative_root_is_saved_absolute(
    mixed_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(mixed_folder.parent)
    dm = ImageDataModule(root=mixed_folder.name, image_size=8, num_workers=0)
    assert dm.hparams.root == str(mixed_folder)
    monkeypatch.chdir(tmp_path / "..")  # a notebook runs elsewhere
    reloaded = ImageDataModule(**dm.hparams)
    reloaded.setup()
    assert len(reloaded.train_set) == 12


def test_splits_are_deterministic_disjoint_and_complete() -> None:
    def build(seed: int) -> ImageDataModule:
        dm = ImageDataModule(
            source="synthetic", synthetic_images=50, split_seed=seed, num_workers=0
        )
        dm.setup()
        return dm

    train, val, test = _split_items(build(0))
    assert _split_items(build(0)) == [train, val, test]
    assert _split_items(build(1)) != [train, val, test]
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(range(50))


def test_train_loader_shuffles_and_val_loader_does_not() -> None:
    dm = ImageDataModule(
        source="synthetic", synthetic_images=64, image_size=8, batch_size=64, num_workers=0
    )
    dm.setup()
    first, second = (next(iter(dm.train_dataloader()))[0] for _ in range(2))
    assert not torch.equal(first, second)
    val_a, val_b = (next(iter(dm.val_dataloader()))[0] for _ in range(2))
    assert torch.equal(val_a, val_b)


def test_worker_processes_deliver_the_same_batches() -> None:
    batches = []
    for workers in (0, 1):
        dm = ImageDataModule(
            source="synthetic", synthetic_images=32, image_size=8, cache=False, num_workers=workers
        )
        dm.setup()
        loader = dm.val_dataloader()
        assert loader.num_workers == workers
        batches.append(next(iter(loader)))
    assert torch.equal(batches[0][0], batches[1][0])
    assert torch.equal(batches[0][1], batches[1][1])


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"source": "imagenet"}, "data.source"),
        ({"source": "synthetic", "channels": 2}, "data.channels"),
        ({"source": "synthetic", "batch_size": 0}, "data.batch_size"),
        ({"source": "synthetic", "val_fraction": 1.5}, "data.val_fraction"),
        ({"source": "folder", "root": None}, "data.root"),
        ({"source": "synthetic", "background": [1, 2]}, "data.background"),
        ({"source": "synthetic", "cache_workers": 0}, "data.cache_workers"),
    ],
)
def test_bad_data_settings_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ImageDataModule(**kwargs)


def test_visualize_batch_returns_and_saves_a_grid(tmp_path: Path) -> None:
    grid = visualize_batch(torch.rand(10, 3, 8, 8), tmp_path / "grid.png", nrow=5)
    assert grid.shape == (3, 2 * 8 + 3 * 2, 5 * 8 + 6 * 2)
    assert Image.open(tmp_path / "grid.png").size == (grid.shape[2], grid.shape[1])
    assert os.path.getsize(tmp_path / "grid.png") > 0
