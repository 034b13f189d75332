"""`ImageDataModule`: any image source, decoded once, split deterministically, batched.

Batches are `(images, labels)`: uint8 `(B, C, H, W)` images and int64 labels. The model
scales images to [0, 1] on its own device, so a quarter of the bytes travel there.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import suppress
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cvae.data.cache import Decoded, decode_source
from cvae.data.decode import Preprocess
from cvae.data.folder import check_root
from cvae.data.presets import SOURCES, ImageSource, load_source

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]
SHOWN_SKIPPED = 5  # how many skipped files a warning names


class DecodedDataset(Dataset):
    """Items of a source decoded on access: the decode-per-epoch path (`cache: false`)."""

    def __init__(self, source: ImageSource, preprocess: Preprocess, indices: np.ndarray) -> None:
        self.source, self.preprocess, self.indices = source, preprocess, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = int(self.indices[index])
        pixels = self.source.decode(item, self.preprocess)
        return torch.from_numpy(pixels), int(self.source.labels[item])


class CachedDataset(Dataset):
    """Items of a decoded (memory-mapped) array, read a whole batch at a time."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
        self.images, self.labels, self.indices = images, labels, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = int(self.indices[index])
        return torch.from_numpy(np.array(self.images[item])), int(self.labels[item])

    def __getitems__(self, indices: list[int]) -> Batch:
        items = self.indices[indices]
        images = torch.from_numpy(self.images[items])  # fancy indexing copies: writable
        return images, torch.from_numpy(self.labels[items])


def _already_batched(batch: Batch) -> Batch:
    return batch


class EpochSampler(Sampler[int]):
    """Positions of a split in an order fixed by `(seed, epoch)`: this rank's share of it,
    from where an interrupted epoch stopped.

    The seed is the one torch's global generator was seeded with (`seed`, alike on every
    rank), not a draw from it: the order does not depend on what ran before the loaders (a
    model's initialisation, a summary's forward), so jobs of a sweep over model sizes or
    priors see the same batches. Each rank takes every `world_size`-th position; training
    shares are cut to equal length, so ranks step together. Lightning calls `set_epoch`
    before each epoch; a plain loop gets the next epoch's order after each full pass.
    `resume(epoch, done)` skips the first `done` positions of that epoch once: a checkpoint
    saved mid-epoch goes on with the batches it had not trained on.
    """

    def __init__(self, size: int, shuffle: bool, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.shuffle, self.rank, self.world_size = size, shuffle, rank, world_size
        self.seed, self.epoch = torch.initial_seed(), 0
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, done: int) -> None:
        self._resume = (epoch, done)

    def __len__(self) -> int:
        if self.shuffle:  # equal shares: every rank takes the same number of steps
            return self.size // self.world_size
        return len(range(self.rank, self.size, self.world_size))

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        share = order[self.rank :: self.world_size][: len(self)]
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        yield from share[start:].tolist()
        self.epoch += 1


class DeviceBatches:
    """Batches sliced on the device that holds the whole uint8 array, in `sampler`'s order.

    No worker processes and no host-to-device copy per batch.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        batch_size: int,
        sampler: EpochSampler,
    ) -> None:
        self.images, self.labels, self.indices = images, labels, indices
        self.batch_size, self.sampler = batch_size, sampler
        self.batch_sampler = None  # what Lightning looks for on a loader, as on a DataLoader

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        positions = torch.tensor(list(self.sampler), dtype=torch.long)
        indices = self.indices[positions.to(self.indices.device)]
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            yield self.images[batch], self.labels[batch]


def _upload(array: np.ndarray, device: torch.device, chunk: int = 4096) -> torch.Tensor:
    """Copy a (memory-mapped) array to `device` a chunk at a time: no full copy in RAM."""
    tensor = torch.empty(array.shape, dtype=torch.uint8, device=device)
    for start in range(0, len(array), chunk):
        tensor[start : start + chunk] = torch.from_numpy(np.array(array[start : start + chunk]))
    return tensor


def _bernoulli(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 images with each pixel set to 255 with probability intensity / 255, else 0."""
    noise = torch.rand(images.shape, generator=generator, device=images.device)
    return (noise * 255 < images).to(torch.uint8) * 255


def _binarized(dataset: CachedDataset, seed: int) -> CachedDataset:
    """A split binarised once with a fixed seed, held in memory (binary sets are small)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.from_numpy(dataset.images[dataset.indices])
    binary = _bernoulli(images, generator).numpy()
    labels = dataset.labels[dataset.indices]
    return CachedDataset(binary, labels, np.arange(len(binary)))


def usable_cores() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores or 1


def default_num_workers() -> int:
    """Half the usable cores (at most 8): the other half keeps the model busy."""
    return min(8, usable_cores() // 2)


def user_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/cvae` (default `~/.cache/cvae`)."""
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "cvae"


def default_cache_dir(root: str | None) -> Path:
    """`<root>/.cvae-cache` where the data root exists and can be written to; else the
    user's cache folder (sources without a root, a preset whose root does not exist, data on
    a read-only file system such as a cluster's shared datasets), said in one line."""
    if root is None:
        return user_cache_dir()
    beside = Path(root) / ".cvae-cache"
    if not Path(root).is_dir():
        reason = "does not exist"
    elif _writable(beside):
        return beside
    else:
        reason = "is not writable"
    log.info("data.root=%s %s: the decoded-image cache goes to %s", root, reason, user_cache_dir())
    return user_cache_dir()


def _writable(folder: Path) -> bool:
    """Whether files can be created in `folder`. Tried, not inferred from permission bits:
    root ignores those, but not a read-only mount. A folder made for the try is removed
    again (if still empty): the cache builds it when it has something to keep, so a run
    that fails first (an empty data folder) adds nothing to the user's data."""
    existed = folder.exists()
    try:
        folder.mkdir(exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False
    finally:
        if not existed:
            with suppress(OSError):
                folder.rmdir()


def _split_size(total: int, fraction: float) -> int:
    """At least one item for any positive fraction, so a small folder still validates."""
    return max(1, round(total * fraction)) if fraction > 0 else 0


class ImageDataModule(pl.LightningDataModule):
    """Batches of `(images, labels)`: uint8 `(B, C, H, W)` images and int64 labels.

    `source` picks where images come from: `folder` (an ImageFolder-style tree under
    `root`, labels from first-level subfolders or -1), `fashion_mnist`, `mnist`, `cifar10`
    or `synthetic`. With `cache` (the default) every image is decoded once into a
    memory-mapped array under `cache_dir` and later epochs and runs read only that; files
    that cannot be decoded are skipped, counted and named in a warning (an error with
    `strict`). Validation (and test, for sources without an official test split) are carved
    from the usable images by a seeded permutation, so splits never change between runs.
    `on_device` moves the whole array to the accelerator once and batches there.
    `binarize` makes images binary: training images afresh at every step (in the trainer),
    validation and test images once, with `split_seed`.
    """

    def __init__(
        self,
        source: str = "folder",
        root: str | None = None,
        image_size: int = 64,
        channels: int = 3,
        crop_size: int | None = None,
        background: int | list[int] = 0,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        cache: bool = True,
        cache_dir: str | None = None,
        cache_workers: int | None = None,
        strict: bool = False,
        on_device: bool = False,
        binarize: bool = False,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int = 2,
        download: bool = False,
        synthetic_images: int = 2048,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"data.source={source!r} is not one of {', '.join(SOURCES)}")
        if image_size < 1:
            raise ValueError(f"data.image_size must be >= 1, got {image_size}")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}")
        if crop_size is not None and crop_size < 1:
            raise ValueError(f"data.crop_size must be null or >= 1, got {crop_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        for key, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0 <= fraction < 1:
                raise ValueError(f"data.{key} must be in [0, 1), got {fraction}")
        if val_fraction + test_fraction >= 1:
            raise ValueError("data.val_fraction + data.test_fraction must be below 1")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers must be null or >= 0, got {num_workers}")
        if cache_workers is not None and cache_workers < 1:
            raise ValueError(f"data.cache_workers must be null or >= 1, got {cache_workers}")
        for key, wanted in (("on_device", on_device), ("binarize", binarize)):
            if wanted and not cache:
                raise ValueError(f"data.{key}=true needs data.cache=true (the decoded array)")
        if source == "folder":
            check_root(root)
        # Absolute, so a checkpoint's data settings reload from any working directory.
        root = str(Path(root).expanduser().resolve()) if root is not None else None
        cache_dir = str(Path(cache_dir).expanduser().resolve()) if cache_dir else None
        # A list, or Hydra's ListConfig (a Sequence, not a list): plain ints, which a
        # checkpoint's weights-only loading accepts.
        if isinstance(background, Sequence) and not isinstance(background, str):
            background = [int(value) for value in background]
        self.preprocess = Preprocess(image_size, channels, crop_size, background)
        self.save_hyperparameters()  # plain values: the datamodule reloads from a checkpoint
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(root)
        self.cache_workers = cache_workers or usable_cores()
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.num_images = 0  # usable images in the source (train pool and official test)
        self.skipped: list[tuple[str, str]] = []  # (file, reason) of those left out
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._sources: tuple[ImageSource, ImageSource | None] | None = None
        self._on_device: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._samplers: dict[str, EpochSampler] = {}
        self._train_order: dict | None = None  # from a checkpoint: where to resume the epoch

    def _load_sources(self) -> tuple[ImageSource, ImageSource | None]:
        if self._sources is None:
            hp = self.hparams
            self._sources = load_source(
                hp.source,
                hp.root,
                download=hp.download,
                image_size=hp.image_size,
                synthetic_images=hp.synthetic_images,
                seed=hp.split_seed,
            )
        return self._sources

    @property
    def class_names(self) -> list[str]:
        """Names of the labels 0, 1, ...: the class subfolders of a folder (sorted), the
        classes of a preset set; empty for a flat folder, whose images have no class."""
        return list(self._load_sources()[0].classes)

    def labelled_classes(self, key: str = "model.conditional") -> list[str]:
        """`class_names`, when every image has a class; else a one-line error naming `key`
        (what needs the labels) and the folder layout that gives them."""
        pool = self._load_sources()[0]
        unlabelled = int((pool.labels < 0).sum())
        if unlabelled or not pool.classes:
            raise ValueError(
                f"{key}=true needs a class for every image, but {unlabelled} of {len(pool)} "
                f"images of {pool.name} are not in a class subfolder: put each class's images "
                "in a subfolder of data.root named after the class (data.root/<class>/<image>)"
            )
        return list(pool.classes)

    def _decode(self, source: ImageSource) -> Decoded:
        if self.hparams.cache or source.may_fail:  # a scan finds broken files up front
            return decode_source(
                source, self.preprocess, self.cache_dir, self.cache_workers, self.hparams.cache
            )
        return Decoded(None, np.arange(len(source)), [])

    def prepare_data(self) -> None:
        """Build the cache once per machine; the other ranks wait, then read it. A source
        without a usable image fails here, before a run writes anything (config tree,
        TensorBoard events)."""
        for source in self._load_sources():
            if source is not None:
                decoded = self._decode(source)
                if len(decoded.valid) == 0:
                    self._report(decoded, source)  # the error: no usable images

    def _report(self, decoded: Decoded, source: ImageSource) -> None:
        """One line: how many images are used and, naming the first few, which were not."""
        used, skipped = len(decoded.valid), len(decoded.skipped)
        if skipped:
            shown = "; ".join(f"{item} ({why})" for item, why in decoded.skipped[:SHOWN_SKIPPED])
            more = f"; and {skipped - SHOWN_SKIPPED} more" if skipped > SHOWN_SKIPPED else ""
            summary = (
                f"{source.name}: {skipped} of {len(source)} files could not be decoded: "
                f"{shown}{more}"
            )
            if used == 0:
                raise ValueError(f"no usable images: {summary}")
            if self.hparams.strict:
                raise ValueError(f"data.strict=true: {summary}")
            log.warning("%s. %d images used, %d skipped.", summary, used, skipped)
        else:
            log.info("%s: %d images used, 0 skipped.", source.name, used)
        self.num_images += used
        self.skipped += decoded.skipped

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        pool, official_test = self._load_sources()
        decoded = self._decode(pool)
        self._report(decoded, pool)
        total = len(decoded.valid)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(hp.split_seed))
        order = decoded.valid[order.numpy()]
        n_val = _split_size(total, hp.val_fraction)
        n_test = 0 if official_test is not None else _split_size(total, hp.test_fraction)
        if total - n_val - n_test < 1:
            raise ValueError(
                f"{pool.name} has {total} usable images: too few for "
                f"val_fraction={hp.val_fraction} and test_fraction={hp.test_fraction}"
            )
        splits = {
            "train": (pool, decoded, order[n_val + n_test :]),
            "val": (pool, decoded, order[:n_val]),
            "test": (pool, decoded, order[n_val:][:n_test]),
        }
        if official_test is not None:
            decoded_test = self._decode(official_test)
            self._report(decoded_test, official_test)
            splits["test"] = (official_test, decoded_test, decoded_test.valid)
        datasets = {
            name: (
                CachedDataset(decoded.images, source.labels, indices)
                if decoded.images is not None
                else DecodedDataset(source, self.preprocess, indices)
            )
            for name, (source, decoded, indices) in splits.items()
        }
        if hp.binarize:  # evaluation data binarised once, so every run sees the same bits
            for name in ("val", "test"):
                datasets[name] = _binarized(datasets[name], seed=hp.split_seed)
        self.train_set, self.val_set, self.test_set = datasets.values()
        if hp.on_device:
            self._move_to_device(datasets)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """With `binarize`, training images are drawn afresh at every step: each pixel is 1
        with probability its intensity (on the device, after the copy)."""
        if self.hparams.binarize and self.trainer is not None and self.trainer.training:
            images, labels = batch
            return _bernoulli(images), labels
        return batch

    def _move_to_device(self, datasets: dict[str, CachedDataset]) -> None:
        """One upload per decoded array, shared by the splits that index it."""
        trainer = self.trainer
        if trainer is not None:
            device = trainer.strategy.root_device
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        uploaded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, dataset in datasets.items():
            if id(dataset.images) not in uploaded:
                uploaded[id(dataset.images)] = (
                    _upload(dataset.images, device),
                    torch.from_numpy(dataset.labels).to(device),
                )
            indices = torch.from_numpy(np.asarray(dataset.indices)).to(device)
            self._on_device[name] = (*uploaded[id(dataset.images)], indices)
        log.info("data: %d images moved to %s", sum(len(i) for i, _ in uploaded.values()), device)

    def _sampler(self, name: str, size: int) -> EpochSampler:
        """One sampler per split for the whole run: its epoch and resume point live there."""
        if name not in self._samplers:
            trainer = self.trainer
            rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
            if name.startswith("ordered-"):  # every image, in this process alone
                rank, world_size = 0, 1
            sampler = EpochSampler(size, shuffle=name == "train", rank=rank, world_size=world_size)
            self._samplers[name] = sampler
            if name == "train":
                self._resume_train_order()
        return self._samplers[name]

    def state_dict(self) -> dict:
        """Where training is in this epoch's order, saved in every checkpoint: a run resumed
        from a checkpoint saved mid-epoch trains on the batches the epoch had left."""
        sampler, trainer = self._samplers.get("train"), self.trainer
        if sampler is None or trainer is None:
            return {}
        loop = trainer.fit_loop
        batches = loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:  # the epoch is over: the next starts whole
            batches = 0
        # The epoch these batches belong to, the last one started: after a stop at
        # `trainer.max_steps` mid-epoch, Lightning's `current_epoch` is already the next one.
        epoch = max(loop.epoch_progress.current.started - 1, 0)
        return {
            "train_order": {
                "seed": sampler.seed,
                "epoch": epoch,
                "positions_done": batches * self.hparams.batch_size,
            }
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._train_order = state_dict.get("train_order")
        self._resume_train_order()

    def _resume_train_order(self) -> None:
        """Hand a checkpoint's place in the epoch to the training sampler, if both exist
        (Lightning restores the data module before or after it asks for loaders)."""
        sampler = self._samplers.get("train")
        if sampler is not None and self._train_order is not None:
            sampler.seed = self._train_order["seed"]
            sampler.resume(self._train_order["epoch"], self._train_order["positions_done"])

    def _loader(self, name: str, dataset: Dataset | None) -> DataLoader | DeviceBatches:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        sampler = self._sampler(name, len(dataset))
        if name in self._on_device:
            return DeviceBatches(*self._on_device[name], self.hparams.batch_size, sampler)
        options: dict = {
            "batch_size": self.hparams.batch_size,
            "sampler": sampler,
            # Worker seeds from a generator of the loader's own: starting an epoch leaves
            # torch's global one alone, so a resumed run draws what the first one drew.
            "generator": torch.Generator().manual_seed(sampler.seed),
        }
        if isinstance(dataset, CachedDataset):  # no decoding left: the main process suffices
            options["collate_fn"] = _already_batched
        elif self.num_workers > 0:
            options.update(
                num_workers=self.num_workers,
                persistent_workers=self.hparams.persistent_workers,
                prefetch_factor=self.hparams.prefetch_factor,
            )
        return DataLoader(dataset, pin_memory=self.pin_memory, **options)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("train", self.train_set)

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("val", self.val_set)

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test", self.test_set)

    def ordered_dataloader(self, split: str) -> DataLoader | DeviceBatches:
        """Every image of `split` (`train`, `val`, `test`) once, in a fixed order, whatever
        epoch or resume point training is at: what sampler fits and evaluations read. `all`:
        every usable image of the source, with fixed bits under `binarize` as a val or test
        split gets them (asked before the data is set up: it takes the whole source)."""
        if split == "all":
            if self.train_set is not None:
                raise RuntimeError("ordered_dataloader('all') must come before setup()")
            self.hparams.val_fraction = self.hparams.test_fraction = 0.0
            self.setup("test")
            every = self.train_set  # with no val or test share: all of them
            if self.hparams.binarize:
                every = _binarized(every, seed=self.hparams.split_seed)
            return self._loader("ordered-all", every)
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r} is not one of train, val, test, all")
        self.setup("fit")
        return self._loader(f"ordered-{split}", getattr(self, f"{split}_set"))
