"""Sample quality: FID and KID between prior samples and real images, through torchmetrics,
in the features of torch-fidelity's Inception network (the original TensorFlow FID weights)
or of any feature network saved as TorchScript (`eval.fid_features=PATH`).

Offline machines are normal: the Inception weights come from `eval.fid_weights=PATH` or the
torch hub cache, and when neither has them and the network cannot be reached, the command
stops at once with one line naming the file and where to put it (no download attempt, no
hang). A feature network file is read locally and never downloads anything.

Every extractor here has one contract, the one a feature network file must keep: float32
images `(B, C, H, W)` in [0, 1], C the data's channels, any H and W (the network resizes)
-> `(B, F)` float features. The Inception network is wrapped to keep it (`Inception`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from cvae.metrics import colour_distance, colour_histogram, is_colour, named
from cvae.models import CVAE
from cvae.models.user_api import LatentSource
from cvae.pixels import unit_range
from cvae.progress import ProgressReport

log = logging.getLogger(__name__)
WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[-1]
KID_SUBSET_SIZE = 1000  # torchmetrics' default: KID is averaged over subsets of this size
KID_SUBSETS = 100
# What `cvae.train_features` stores inside a feature network file (torch.jit's extra files):
# its channels, accuracy, training data. Files from elsewhere need not have it.
FEATURES_META = "cvae_features.json"
# TorchScript is the format asked of feature network files; torch 2.15 deprecates it and
# warns on every script and load. Silenced only around those calls.
JIT_DEPRECATED = r"`torch\.jit\.(script|load)` is deprecated"


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


def _reason(error: BaseException) -> str:
    """One line of why a library call failed: the first sentence of the message, or its last
    line when that is the real error under a TorchScript interpreter traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[-1] if "TorchScript" in lines[0] else lines[0]
    return re.split(r"(?<=\.)\s", line, maxsplit=1)[0]


class Inception(nn.Module):
    """torch-fidelity's Inception v3 under the feature network contract: float images in
    [0, 1] (grayscale repeated to RGB, rounded to uint8 as the network expects) -> 2048 pool
    features."""

    num_features = 2048

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(as_rgb_uint8(images))


def inception(weights: str | os.PathLike | None = None) -> nn.Module:
    """torch-fidelity's Inception v3 (2048 pool features of images of any size), resized to
    299 x 299 as the original TensorFlow FID code does (`antialias=False`): FID comparable
    with the original implementation's and pytorch-fid's."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    path = inception_weights(weights)
    try:
        return Inception(
            NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(path) if path else None,
                antialias=False,
            )
        )
    except Exception as error:  # unpickling, a wrong state dict, a short file: one line
        if path is None:
            raise
        name = f"eval.fid_weights={path}" if weights is not None else str(path)
        raise ValueError(
            f"{name} is not the Inception weights {WEIGHTS_FILE} ({_reason(error)})"
        ) from None


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 `(B, 3, H, W)`: what the Inception network takes; grayscale repeated to 3."""
    if images.dtype != torch.uint8:
        images = (unit_range(images).clamp(0, 1) * 255).round().to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class FeatureNetwork(nn.Module):
    """A feature network file, checked: `num_features` (F, from a probe call), `channels`,
    the file's `path` and `meta` (what `cvae.train_features` stored: test accuracy, data,
    ...; empty for files from elsewhere)."""

    def __init__(
        self, network: nn.Module, num_features: int, channels: int, path: Path, meta: dict
    ) -> None:
        super().__init__()
        self.network, self.num_features, self.channels = network, num_features, channels
        self.path, self.meta = path, meta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network(images)


def load_torchscript(path: Path, key: str) -> tuple[torch.jit.ScriptModule, dict]:
    """The TorchScript module of `path` (on the CPU) and its cvae metadata (empty if none);
    a one-line error naming `key` when the file is missing or not TorchScript."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={path} is not a file (a TorchScript feature network, as "
            "cvae.train_features writes)"
        )
    extra = {FEATURES_META: ""}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", JIT_DEPRECATED)
            network = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as error:  # not a zip, a torch.save pickle, a damaged file
        raise ValueError(f"{key}={path} is not a TorchScript file ({_reason(error)})") from None
    try:
        meta = json.loads(extra[FEATURES_META] or "{}")
    except ValueError:
        meta = {}
    return network, meta if isinstance(meta, dict) else {}


def feature_network(
    path: str | os.PathLike,
    channels: int | None = None,
    image_size: int = 64,
    key: str = "eval.fid_features",
) -> FeatureNetwork:
    """The feature network of a TorchScript file, checked before any work (a one-line error
    naming `key` and the file otherwise): it must take float32 `(2, channels, image_size,
    image_size)` images in [0, 1] and return finite `(2, F)` features. `channels` None: the
    file's own (stored by `cvae.train_features`). Usable as `extractor` of `fid_kid` and
    `sample_quality`."""
    path = Path(path).expanduser()
    network, meta = load_torchscript(path, key)
    own = meta.get("channels")
    if channels is None:
        if own is None:
            raise ValueError(f"{key}={path} does not say its channels: pass channels=1 or 3")
        channels = int(own)
    if own is not None and int(own) != channels:
        raise ValueError(
            f"{key}={path} takes {own}-channel images, but the data has {channels} channel(s)"
        )
    network = network.eval()
    probe = torch.rand(2, channels, image_size, image_size)
    shape = f"(2, {channels}, {image_size}, {image_size})"
    try:
        with torch.inference_mode():
            features = network(probe)
    except Exception as error:
        raise ValueError(
            f"{key}={path} fails on float32 images {shape} in [0, 1] ({_reason(error)})"
        ) from None
    if not (
        isinstance(features, torch.Tensor)
        and features.is_floating_point()
        and features.dim() == 2
        and features.shape[0] == 2
        and features.shape[1] >= 1
        and bool(features.isfinite().all())
    ):
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(
            f"{key}={path} returns {got} for images {shape}, not finite float features (2, F)"
        )
    return FeatureNetwork(network, int(features.shape[1]), channels, path, meta)


def feature_extractor(
    features: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    channels: int = 3,
    image_size: int = 64,
) -> nn.Module:
    """The extractor `eval.fid` uses: the feature network file `features`
    (`eval.fid_features`) for images of `channels` and `image_size`, else Inception from
    `weights` (`eval.fid_weights`) or the torch hub cache. Found and checked before any
    evaluation work."""
    if features is None:
        return inception(weights)
    if weights is not None:
        raise ValueError(
            f"eval.fid_features={features} and eval.fid_weights={weights} name two feature "
            "networks: give one"
        )
    return feature_network(features, channels, image_size)


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
    batches (uint8, or floats in [0, 1]), by `extractor`'s features: float32 `(B, C, H, W)`
    in [0, 1] to `(B, F)` (see the module's docstring). The features are computed once and
    handed to torchmetrics' metrics as their custom feature extractor's output (`_Features`).
    KID subsets are drawn with `seed`."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    with torch.inference_mode():
        for is_real, batches in ((True, real), (False, fake)):
            for images in batches:
                images = unit_range(images).float().clamp(0, 1)
                features[is_real].append(extractor(images).double().flatten(1))
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
    return {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "fid_real_images": len(real_features),
        "fid_samples": len(fake_features),
    }


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
    sampler: LatentSource | None = None,
) -> Iterator[torch.Tensor]:
    """`count` samples (latents from `sampler`, None: the prior); a conditional model draws
    the real images' classes (read once the real images are done), repeated as needed: the
    data's class proportions."""
    labels = None
    if model.conditional:
        seen = torch.cat(real_labels)
        labels = seen.repeat(math.ceil(count / len(seen)))[:count]
    for start in range(0, count, batch_size):
        part = None if labels is None else labels[start : start + batch_size]
        yield model.sample(
            min(batch_size, count - start), generator=generator, labels=part, sampler=sampler
        ).cpu()


def sample_quality(
    model: CVAE,
    loader: Iterable,
    samples: int = 10_000,
    seed: int = 0,
    weights: str | os.PathLike | None = None,
    extractor: nn.Module | None = None,
    batch_size: int = 64,
    progress: bool = False,
    sampler: LatentSource | None = None,
) -> dict:
    """FID and KID between `samples` samples (decoded means of latents from `sampler`, a
    fitted `cvae.samplers` one, or None: the model's prior) and as many images of
    `loader` (all of them if it has fewer); a conditional model's samples have the classes
    of those images (`loader`'s labels: the model's class indices). `extractor` replaces the
    Inception network (a module from float images in [0, 1] to features, such as
    `feature_network(path)`'s); otherwise it is loaded from `weights` or the torch hub cache
    (see `inception_weights`). Images of three channels also get `colour_w1_samples`: per
    channel, how far the samples' intensities lie from the real images'
    (`metrics.colour_distance`)."""
    if samples < 2:
        raise ValueError(f"eval.fid_samples must be >= 2, got {samples}")
    if extractor is None:
        extractor = inception(weights)
    extractor = extractor.to(model.device).eval()
    report = ProgressReport(2 * samples, "FID/KID features", enabled=progress)

    histograms: dict[str, torch.Tensor] = {}  # colour images: both sides' colour histograms

    def counted(batches: Iterable[torch.Tensor], side: str) -> Iterator[torch.Tensor]:
        for images in batches:
            if is_colour(images):
                histograms[side] = histograms.get(side, 0) + colour_histogram(images)
            yield images.to(model.device)
            report.advance(len(images))

    generator = torch.Generator().manual_seed(seed)
    labels: list[torch.Tensor] = []  # filled by the real pass, which `fid_kid` runs first
    try:
        scores = fid_kid(
            counted(_real_images(loader, samples, labels), "real"),
            counted(_samples(model, samples, batch_size, generator, labels, sampler), "samples"),
            extractor,
            seed,
        )
    finally:
        report.close()
    if len(histograms) == 2:  # how far the samples' colours are from the real images'
        distance = colour_distance(histograms["real"], histograms["samples"])
        scores["colour_w1_samples"] = named(distance)
    return scores
