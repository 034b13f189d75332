"""Image sources behind the data presets: folders, idx files, torchvision sets, synthetic shapes.

Every source is an `ImageSource`: numbered images with labels that one `Preprocess` decodes.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import random
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cvae.data.decode import Preprocess, open_image
from cvae.data.folder import index_folder
from cvae.errors import error_line

log = logging.getLogger(__name__)

SOURCES = ("folder", "fashion_mnist", "mnist", "cifar10", "synthetic")
# Where Debian's dataset-fashion-mnist package puts the idx files.
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
# Names of the label values 0, 1, ... of the preset sets (what a conditional model is asked for).
CLASS_NAMES = {
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "mnist": [str(digit) for digit in range(10)],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
}


class ImageSource:
    """Numbered images with labels, decoded to uint8 arrays by a `Preprocess`.

    `fingerprint` describes the content for the decoded-image cache: a source whose
    fingerprint is unchanged decodes to the same pixels.
    """

    labels: np.ndarray
    classes: Sequence[str] = ()  # names of the labels 0, 1, ...; empty: no classes (label -1)
    name: str  # for messages: where the images come from
    kind: str  # for file names: what sort of source this is
    may_fail = False  # whether an item can turn out undecodable (files can)

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def decode(self, index: int, preprocess: Preprocess) -> np.ndarray:
        return preprocess(self.image(index))

    def item_name(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def fingerprint(self) -> dict:
        raise NotImplementedError


class FileDataset(ImageSource):
    """Image files; may hold broken ones, which `decode` reports as `ImageDecodeError`."""

    may_fail = True
    kind = "folder"

    def __init__(
        self, root: Path, files: list[Path], labels: list[int], classes: list[str] | None = None
    ) -> None:
        self.root, self.files, self.labels = root, files, np.asarray(labels, dtype=np.int64)
        self.classes = list(classes or [])
        self.name = f"data.root={root}"

    def image(self, index: int) -> Image.Image:
        return open_image(self.files[index])

    def decode(self, index: int, preprocess: Preprocess) -> np.ndarray:
        return preprocess.load(self.files[index])

    def item_name(self, index: int) -> str:
        return str(self.files[index].relative_to(self.root))

    def fingerprint(self) -> dict:
        """Every file's path, size and modification time: any change shows."""
        entries = []
        for path in self.files:
            try:
                stat = path.stat()
                entries.append((str(path.relative_to(self.root)), stat.st_size, stat.st_mtime_ns))
            except OSError:  # a dangling link: listed, so that it is counted as skipped
                entries.append((str(path.relative_to(self.root)), -1, -1))
        return {"root": str(self.root), "files": entries, "labels": self.labels.tolist()}


class ArrayDataset(ImageSource):
    """Images held in a uint8 array of shape (N, H, W) or (N, H, W, C)."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        name: str = "array",
        classes: list[str] | None = None,
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, np.int64)
        self.classes = list(classes or [])
        self.name = self.kind = name

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def fingerprint(self) -> dict:
        digest = hashlib.blake2b(np.ascontiguousarray(self.images).data, digest_size=16)
        digest.update(np.ascontiguousarray(self.labels).data)
        return {"name": self.name, "shape": list(self.images.shape), "content": digest.hexdigest()}


class SyntheticShapes(ImageSource):
    """Coloured circles, squares and triangles (labels 0, 1, 2) drawn on demand from a seed.

    For smoke runs and tests with nothing on disk: item `i` is the same image every time.
    """

    SHAPES = ("circle", "square", "triangle")
    kind = "synthetic"

    def __init__(self, num_images: int = 2048, image_size: int = 64, seed: int = 0) -> None:
        if num_images < 1:
            raise ValueError(f"data.synthetic_images must be >= 1, got {num_images}")
        self.image_size, self.seed = image_size, seed
        self.classes = list(self.SHAPES)
        self.labels = np.array(
            [self._rng(i).randrange(len(self.SHAPES)) for i in range(num_images)]
        )
        self.name = f"synthetic shapes (seed {seed})"

    def _rng(self, index: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + index)

    def image(self, index: int) -> Image.Image:
        rng = self._rng(index)
        label = rng.randrange(len(self.SHAPES))
        size = self.image_size
        background = tuple(rng.randrange(0, 96) for _ in range(3))
        colour = tuple(rng.randrange(128, 256) for _ in range(3))
        image = Image.new("RGB", (size, size), background)
        radius = rng.uniform(0.15, 0.35) * size
        cx, cy = (rng.uniform(radius, size - radius) for _ in range(2))
        draw = ImageDraw.Draw(image)
        if label == 0:
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        elif label == 1:
            draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
        else:
            draw.polygon(
                [(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)],
                fill=colour,
            )
        return image

    def fingerprint(self) -> dict:
        return {"synthetic": len(self), "image_size": self.image_size, "seed": self.seed}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST's format), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: header says {shape}, found {array.size} bytes")
    return array.reshape(shape)


IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_dir(folders: list[Path]) -> Path | None:
    """The first folder holding all four idx files, plain or gzipped."""
    names = [name for pair in IDX_FILES.values() for name in pair]
    for folder in folders:
        if all((folder / n).is_file() or (folder / f"{n}.gz").is_file() for n in names):
            return folder
    return None


def _read_idx_split(folder: Path, split: str, source: str) -> ArrayDataset:
    arrays = []
    for name in IDX_FILES[split]:
        path = folder / name
        arrays.append(read_idx(path if path.is_file() else f"{path}.gz"))
    return ArrayDataset(*arrays, name=f"{source}-{split}", classes=CLASS_NAMES[source])


def _torchvision_class(source: str) -> type:
    from torchvision import datasets

    return {"fashion_mnist": datasets.FashionMNIST, "mnist": datasets.MNIST}[source]


def load_idx_source(
    source: str, root: str | os.PathLike, download: bool
) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) of Fashion-MNIST or MNIST from idx files, downloading only as a last resort.

    Looks in `root`, in torchvision's layout under it (`root/FashionMNIST/raw`), then in the
    system folder of the Debian package (Fashion-MNIST only), and logs where it read them.
    A download creates `root`; a failed one removes what it created.
    """
    root = Path(root).expanduser()
    torchvision_class = _torchvision_class(source)
    raw = root / torchvision_class.__name__ / "raw"
    folders = [root, raw]
    if source == "fashion_mnist":
        folders.append(FASHION_MNIST_SYSTEM_DIR)
    folder = _find_idx_dir(folders)
    if folder is None and download:
        folder = _download_idx(source, root, raw, folders)
    if folder is None:
        raise FileNotFoundError(
            f"{source}: no idx files in {', '.join(map(str, folders))}; "
            "set data.root to a folder holding them or data.download=true"
        )
    where = f"{source}: images from {folder}"
    if folder == FASHION_MNIST_SYSTEM_DIR:
        state = "does not exist" if not root.exists() else "holds no idx files"
        where += f" (Debian's dataset-fashion-mnist package: data.root={root} {state})"
    log.info(where)
    return _read_idx_split(folder, "train", source), _read_idx_split(folder, "test", source)


def _download_idx(source: str, root: Path, raw: Path, folders: list[Path]) -> Path | None:
    """Download with torchvision into `root`."""
    try:
        with _removed_on_failure(root):
            _torchvision_class(source)(str(root), train=True, download=True)
    except Exception as error:  # no network, a mirror down, a bad checksum
        raise FileNotFoundError(
            f"{source}: no idx files in {', '.join(map(str, folders))} "
            f"and the download into data.root={root} failed: {error_line(error)}"
        ) from error
    return _find_idx_dir([raw])


@contextmanager
def _removed_on_failure(root: Path) -> Iterator[None]:
    """A download that fails leaves no folder it created (a mistyped root stays uncreated)."""
    missing = [folder for folder in (root, *root.parents) if not folder.exists()]
    try:
        yield
    except BaseException:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise


def load_cifar10(root: str | os.PathLike, download: bool) -> tuple[ArrayDataset, ArrayDataset]:
    from torchvision.datasets import CIFAR10

    try:
        with _removed_on_failure(Path(root).expanduser()):
            splits = [CIFAR10(str(root), train=t, download=download) for t in (True, False)]
    except Exception as error:
        raise FileNotFoundError(
            f"cifar10: no dataset under data.root={root} "
            f"({'download failed' if download else 'data.download=false'}): {error}"
        ) from error
    return tuple(
        ArrayDataset(s.data, np.asarray(s.targets), name=f"cifar10-{n}", classes=s.classes)
        for s, n in zip(splits, ("train", "test"), strict=True)
    )


def load_source(
    source: str,
    root: str | os.PathLike | None,
    download: bool = False,
    image_size: int = 64,
    synthetic_images: int = 2048,
    seed: int = 0,
) -> tuple[ImageSource, ImageSource | None]:
    """The (train pool, official test set or None) of a source."""
    if source == "folder":
        index = index_folder(root)
        return FileDataset(index.root, index.files, index.labels, index.classes), None
    if source in ("fashion_mnist", "mnist"):
        return load_idx_source(source, root or ".", download)
    if source == "cifar10":
        return load_cifar10(root or ".", download)
    if source == "synthetic":
        return SyntheticShapes(synthetic_images, image_size, seed), None
    raise ValueError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
