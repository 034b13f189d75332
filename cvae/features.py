"""A feature network for FID in a data set's own domain (`eval.fid_features=PATH`): a small
CNN classifier trained on the labels of the training split, saved as TorchScript.

Inception features judge natural photographs; on Fashion-MNIST, or offline where the
Inception weights cannot be fetched, a classifier of the data itself is the judge at hand
(FID in LeNet features is the usual MNIST practice). Its features are the layer before the
class scores. FIDs in these features are comparable only with each other (same file), never
with published Inception FIDs.

`python -m cvae.train_features [data=...]` writes `features.pt` (the contract of
`cvae.fid.feature_network`: float32 `(B, C, H, W)` in [0, 1], any H and W, -> `(B, F)`;
`classify` gives the class scores) and `features.json` (test accuracy, data, sizes, time).
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from cvae.fid import FEATURES_META, JIT_DEPRECATED, feature_network

log = logging.getLogger(__name__)
STANDARDIZE_IMAGES = 10_000  # training images whose features set the mean and scale


class Classifier(nn.Module):
    """Three conv-BN-ReLU-maxpool blocks (`width`, 2x, 4x channels) at `input_size`, a linear
    layer to `feature_dim` features, and the class scores. Images of any size are resized
    inside (bilinear, antialiased), so one file serves 28, 32 or 64 px data alike.

    The features are standardised (`standardize`: zero mean, unit variance per feature on
    training images), so their scale is the data's, not the training's: KID's cubic kernel
    (x.y / F + 1)^3 needs features of order one, as Inception's are."""

    def __init__(
        self,
        channels: int,
        num_classes: int,
        input_size: int = 32,
        width: int = 32,
        feature_dim: int = 128,
    ) -> None:
        super().__init__()
        if input_size < 8:
            raise ValueError(f"classifier.input_size must be >= 8, got {input_size}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.input_size, self.channels = input_size, channels
        blocks: list[nn.Module] = []
        width_in = channels
        for block in range(3):
            width_out = width * 2**block
            conv = nn.Conv2d(width_in, width_out, 3, padding=1, bias=False)
            blocks += [conv, nn.BatchNorm2d(width_out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width_in = width_out
        self.trunk = nn.Sequential(*blocks)
        self.embed = nn.Linear(width_in * (input_size // 8) ** 2, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The layer before the class scores, before its ReLU (no unit is dead for every
        image, so no feature has zero variance by construction)."""
        size = self.input_size
        if images.shape[-2] != size or images.shape[-1] != size:
            images = F.interpolate(
                images, size=[size, size], mode="bilinear", align_corners=False, antialias=True
            )
        return self.embed(self.trunk(images * 2 - 1).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Standardised features `(B, feature_dim)` of float images in [0, 1]."""
        return (self.embedding(images) - self.feature_mean) / self.feature_std

    @torch.jit.export
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Class scores (logits) `(B, classes)`."""
        return self.head(self.embedding(images))

    def standardize(self, loader: Iterable, count: int, device: torch.device) -> int:
        """Set the features' mean and standard deviation from the first `count` images of
        `loader` (uint8 batches); returns how many were used."""
        parts, seen = [], 0
        self.eval()
        with torch.inference_mode():
            for images, _ in loader:
                images = images[: count - seen].to(device)
                parts.append(self.embedding(images.float() / 255).double())
                seen += len(images)
                if seen >= count:
                    break
        features = torch.cat(parts)
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))
        return seen


def accuracy(model: nn.Module, loader: Iterable, device: torch.device) -> float:
    """The share of `loader`'s labelled images whose top class is their label."""
    right = total = 0
    model.eval()
    with torch.inference_mode():
        for images, labels in loader:
            labels = labels.to(device)
            scores = model.classify(images.to(device).float() / 255)
            known = labels >= 0
            right += int((scores.argmax(1) == labels)[known].sum())
            total += int(known.sum())
    return right / max(total, 1)


def train_classifier(
    datamodule,
    epochs: int = 2,
    lr: float = 2e-3,
    device: torch.device | str = "cpu",
    progress: bool = True,
    **architecture: int,
) -> tuple[Classifier, dict]:
    """A `Classifier` trained with Adam (cosine decay of `lr`) for `epochs` passes over the
    training split of `datamodule` (an `ImageDataModule` whose images have classes), and what
    was measured: validation accuracy per epoch, test accuracy, time. Seed torch first."""
    from cvae.progress import ProgressReport, duration

    if epochs < 1:
        raise ValueError(f"classifier.epochs must be >= 1, got {epochs}")
    datamodule.prepare_data()
    classes = datamodule.class_names
    if not classes:  # a flat folder: no class subfolders
        raise ValueError(
            f"cvae.train_features trains a classifier on the data's classes, but "
            f"{datamodule.hparams.get('root') or datamodule.hparams.source} has none: put each "
            "class's images in a subfolder of data.root named after it (data.root/<class>/...)"
        )
    datamodule.setup("fit")
    hp, device = datamodule.hparams, torch.device(device)
    model = Classifier(hp.channels, len(classes), **architecture).to(device)
    train_loader = datamodule.train_dataloader()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train_loader))
    report = ProgressReport(
        epochs * len(datamodule.train_set), "classifier training", enabled=progress
    )
    started, val_accuracy = time.monotonic(), []
    try:
        for epoch in range(epochs):
            model.train()
            loss_sum, seen = 0.0, 0
            for images, labels in train_loader:
                images, labels = images.to(device), labels.to(device)
                scores = model.classify(images.float() / 255)
                # labels -1 (files outside class subfolders) are left out
                loss = F.cross_entropy(scores, labels, ignore_index=-1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                loss_sum, seen = loss_sum + float(loss.detach()) * len(images), seen + len(images)
                report.advance(len(images))
            val_accuracy.append(accuracy(model, datamodule.val_dataloader(), device))
            log.info(
                "epoch %d/%d: train loss %.4f, val accuracy %.4f, %s elapsed",
                epoch + 1,
                epochs,
                loss_sum / seen,
                val_accuracy[-1],
                duration(time.monotonic() - started),
            )
    finally:
        report.close()
    train_seconds = time.monotonic() - started
    standardized = model.standardize(train_loader, STANDARDIZE_IMAGES, device)
    test_accuracy = accuracy(model, datamodule.test_dataloader(), device)
    info = {
        "test_accuracy": test_accuracy,
        "test_images": len(datamodule.test_set),
        "val_accuracy": val_accuracy,
        "train_images": len(datamodule.train_set),
        "epochs": epochs,
        "lr": lr,
        "train_seconds": round(train_seconds, 2),
        "standardized_on_train_images": standardized,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "data": {
            k: v
            for k, v in dict(hp).items()
            if k in ("source", "root", "image_size", "channels", "crop_size")
        },
        "classes": list(classes),
        "channels": hp.channels,
        "image_size": hp.image_size,
        "input_size": model.input_size,
        "feature_dim": model.embed.out_features,
    }
    return model.eval(), info


def save_feature_network(model: Classifier, folder: str | os.PathLike, info: dict) -> Path:
    """`folder/features.pt` (TorchScript, `info` inside as `FEATURES_META`, written to a
    `.partial` file and renamed) and `folder/features.json` (`info`); the file is loaded back
    through `cvae.fid.feature_network` and must give the model's features."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, partial = folder / "features.pt", folder / "features.pt.partial"
    model = model.eval().cpu()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", JIT_DEPRECATED)
        scripted = torch.jit.script(model)
    scripted.save(str(partial), _extra_files={FEATURES_META: json.dumps(info)})
    os.replace(partial, path)
    loaded = feature_network(path, key="features.pt")
    probe = torch.rand(4, model.channels, info["image_size"], info["image_size"])
    with torch.inference_mode():
        if not torch.allclose(loaded(probe), model(probe), atol=1e-5):
            raise RuntimeError(f"{path} does not compute the trained network's features")
    info = {**info, "num_features": loaded.num_features}
    (folder / "features.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


def run(cfg: DictConfig) -> dict:
    """What `python -m cvae.train_features` does: train on `cfg.data`, save to the run
    folder, print the test accuracy and the override that uses the file."""
    from hydra.utils import instantiate

    from cvae.loading import device
    from cvae.progress import duration

    torch.manual_seed(int(cfg.seed))  # the weights and the training order
    datamodule = instantiate(cfg.data)
    c = cfg.classifier
    model, info = train_classifier(
        datamodule,
        epochs=int(c.epochs),
        lr=float(c.lr),
        device=device(cfg.device),
        progress=bool(cfg.get("progress", True)),
        input_size=int(c.input_size),
        width=int(c.width),
        feature_dim=int(c.feature_dim),
    )
    path = save_feature_network(model, cfg.paths.output_dir, info)
    log.info(
        "test accuracy %.4f (%d images) after %s of training; wrote %s and %s",
        info["test_accuracy"],
        info["test_images"],
        duration(info["train_seconds"]),
        path,
        path.with_suffix(".json").name,
    )
    log.info(
        "use it: .venv/bin/python -m cvae.evaluate ckpt_path=... eval.fid=true "
        "eval.fid_features=%s",
        path.resolve(),
    )
    return {**info, "path": str(path)}
