"""Sample quality: FID and KID between prior samples and real images, with torch-fidelity's
Inception network (the original TensorFlow FID weights) through torchmetrics.

Offline machines are normal: the weights come from `eval.fid_weights=PATH` or the torch hub
cache, and when neither has them and the network cannot be reached, the command stops at
once with one line naming the file and where to put it (no download attempt, no hang).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from cvae.models import CVAE
from cvae.models.networks import unit_range

log = logging.getLogger(__name__)
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[-1]
KID_SUBSET_SIZE = 1000  # torchmetrics' default: KID is averaged over subsets of this size
KID_SUBSETS = 100


def hub_weights_path() -> Path:
    """Where torch hub (and so torch-fidelity) keeps a downloaded copy of the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def can_reach(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    """A bounded check that a download could start: one TCP connection, `timeout` seconds at
    most. With an HTTP(S) proxy configured, the proxy decides: assume it can."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy")):
        return True
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def inception_weights(weights: str | os.PathLike | None = None) -> Path | None:
    """The local weights file to use: `weights` (which must exist), else the hub cache's
    copy; None when torch-fidelity may download it (the network answers). Otherwise a
    one-line error naming the file and where to put it."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"eval.fid_weights={path} is not a file ({WEIGHTS_FILE})")
        return path
    cached = hub_weights_path()
    if cached.is_file():
        return cached
    if can_reach():
        log.info("FID: downloading the Inception weights to %s", cached)
        return None
    raise FileNotFoundError(
        f"eval.fid=true needs the Inception weights {WEIGHTS_FILE}, which are not in the "
        f"torch hub cache ({cached.parent}/) and cannot be downloaded (no network): fetch "
        f"{WEIGHTS_URL} elsewhere and put it there, or pass eval.fid_weights=PATH"
    )


def inception(weights: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's Inception v3 (2048 pool features of uint8 RGB images of any size),
    resized to 299 x 299 as the original TensorFlow FID code does (`antialias=False`): FID
    comparable with the original implementation's and pytorch-fid's."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = inception_weights(weights)
    try:
        return NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"],
            feature_extractor_weights_path=str(path) if path else None, antialias=False,
        )  # fmt: skip
    except Exception as error:  # unpickling, a wrong state dict, a short file: one line
        if path is None:
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        name = f"eval.fid_weights={path}" if weights is not None else str(path)
        raise ValueError(f"{name} is not the Inception weights {WEIGHTS_FILE} ({reason})") from None


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 `(B, 3, H, W)`: what the Inception network takes; grayscale repeated to 3."""
    if images.dtype != torch.uint8:
        images = (unit_range(images).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class _Features(nn.Module):
    """Features computed once and handed to both metrics as they are."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_kid(
    real: Iterable[torch.Tensor],
    fake: Iterable[torch.Tensor],
    extractor: nn.Module,
    seed: int = 0,
) -> dict[str, float]:
    """FID and KID (mean and standard deviation over subsets) between two sets of image
    batches (uint8, or floats in [0, 1]; 1 or 3 channels), by `extractor`'s features of
    uint8 RGB images, `(B, 3, H, W)` to `(B, F)`. KID subsets are drawn with `seed`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    with torch.inference_mode():
        for is_real, batches in ((True, real), (False, fake)):
            for images in batches:
                features[is_real].append(extractor(as_rgb_uint8(images)).double().flatten(1))
    real_features, fake_features = torch.cat(features[True]), torch.cat(features[False])
    if min(len(real_features), len(fake_features)) < 2:
        raise ValueError("FID needs at least 2 real and 2 generated images")
    width = real_features.shape[1]
    fid = FrechetInceptionDistance(_Features(width))
    subset = min(KID_SUBSET_SIZE, len(real_features), len(fake_features))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save all")
        kid = KernelInceptionDistance(_Features(width), subsets=KID_SUBSETS, subset_size=subset)
    for is_real, values in ((True, real_features), (False, fake_features)):
        fid.update(values, real=is_real)
        kid.update(values, real=is_real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "fid_real_images": len(real_features), "fid_samples": len(fake_features)}  # fmt: skip


def _real_images(
    loader: Iterable, count: int, labels: list[torch.Tensor]
) -> Iterator[torch.Tensor]:
    """The first `count` images of `loader`; their labels are appended to `labels`."""
    seen = 0
    for images, batch_labels in loader:
        images = images[: count - seen]
        labels.append(batch_labels[: len(images)].cpu())
        seen += len(images)
        yield images
        if seen >= count:
            return


def _samples(
    model: CVAE,
    count: int,
    batch_size: int,
    generator: torch.Generator,
    real_labels: list[torch.Tensor],
) -> Iterator[torch.Tensor]:
    """`count` samples; a conditional model draws the real images' classes (read once the
    real images are done), repeated as needed: the data's class proportions."""
    labels = None
    if model.conditional:
        seen = torch.cat(real_labels)
        labels = seen.repeat(math.ceil(count / len(seen)))[:count]
    for start in range(0, count, batch_size):
        part = None if labels is None else labels[start : start + batch_size]
        yield model.sample(min(batch_size, count - start), generator=generator,
                           labels=part).cpu()  # fmt: skip


def sample_quality(
    model: CVAE,
    loader: Iterable,
    samples: int = 10_000,
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    extractor: nn.Module | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, float]:
    """FID and KID between `samples` prior samples (decoded means) and as many images of
    `loader` (all of them if it has fewer); a conditional model's samples have the classes
    of those images (`loader`'s labels: the model's class indices). `extractor` replaces the
    Inception network (a module from uint8 RGB batches to features: tests, other feature
    spaces); otherwise it is loaded from `weights` or the torch hub cache (see
    `inception_weights`)."""
    from cvae.metrics import ProgressReport

    if samples < 2:
        raise ValueError(f"eval.fid_samples must be >= 2, got {samples}")
    if extractor is None:
        extractor = inception(weights)
    extractor = extractor.to(model.device).eval()
    report = ProgressReport(2 * samples, "FID/KID features", enabled=progress)

    def counted(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        for images in batches:
            yield images.to(model.device)
            report.advance(len(images))

    generator = torch.Generator().manual_seed(seed)
    labels: list[torch.Tensor] = []  # filled by the real pass, which `fid_kid` runs first
    try:
        return fid_kid(counted(_real_images(loader, samples, labels)),
                       counted(_samples(model, samples, batch_size, generator, labels)),
                       extractor, seed)  # fmt: skip
    finally:
        report.close()
