"""`ImageDataModule`: any image source, split deterministically, preprocessed, batched."""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from cvae.data.decode import Preprocess
from cvae.data.folder import check_root
from cvae.data.presets import SOURCES, load_source


class PreprocessedDataset(Dataset):
    """(PIL image, label) pairs -> (float tensor in [0, 1], int label)."""

    def __init__(self, dataset: Dataset, preprocess: Preprocess) -> None:
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        return self.preprocess(image), label


def default_num_workers() -> int:
    """Half the usable cores (at most 8): the other half keeps the model busy."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return min(8, (cores or 1) // 2)


def _split_size(total: int, fraction: float) -> int:
    """At least one item for any positive fraction, so a small folder still validates."""
    return max(1, round(total * fraction)) if fraction > 0 else 0


class ImageDataModule(pl.LightningDataModule):
    """Batches of `(images, labels)`: float32 `(B, C, H, W)` in [0, 1] and int64 labels.

    `source` picks where images come from: `folder` (an ImageFolder-style tree under
    `root`, labels from first-level subfolders or -1), `fashion_mnist`, `mnist`, `cifar10`
    or `synthetic`. Validation (and test, for sources without an official test split) are
    carved from the training pool by a seeded permutation, so splits never change between
    runs. `num_workers` and `pin_memory` left as None pick values that suit the machine.
    """

    def __init__(
        self,
        source: str = "folder",
        root: str | None = None,
        image_size: int = 64,
        channels: int = 3,
        crop_size: int | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
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
        if source == "folder":
            check_root(root)
        # Absolute, so a checkpoint's data settings reload from any working directory.
        root = str(Path(root).expanduser().resolve()) if root is not None else None
        self.save_hyperparameters()  # plain values: the datamodule reloads from a checkpoint
        self.preprocess = Preprocess(image_size=image_size, channels=channels, crop_size=crop_size)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        pool, official_test = load_source(
            hp.source,
            hp.root,
            download=hp.download,
            image_size=hp.image_size,
            synthetic_images=hp.synthetic_images,
            seed=hp.split_seed,
        )
        total = len(pool)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(hp.split_seed))
        n_val = _split_size(total, hp.val_fraction)
        n_test = 0 if official_test is not None else _split_size(total, hp.test_fraction)
        if total - n_val - n_test < 1:
            raise ValueError(
                f"data.root={hp.root} has {total} images: too few for "
                f"val_fraction={hp.val_fraction} and test_fraction={hp.test_fraction}"
            )
        order = order.tolist()
        val = Subset(pool, order[:n_val])
        test = official_test if official_test is not None else Subset(pool, order[n_val:][:n_test])
        train = Subset(pool, order[n_val + n_test :])
        self.train_set, self.val_set, self.test_set = (
            PreprocessedDataset(split, self.preprocess) for split in (train, val, test)
        )

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        options = {}
        if self.num_workers > 0:
            options = {
                "persistent_workers": self.hparams.persistent_workers,
                "prefetch_factor": self.hparams.prefetch_factor,
            }
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            **options,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)
