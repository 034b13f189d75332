"""How much sooner cvae's default configuration reaches the test loss that a textbook VAE
reaches in a fixed time budget, both on Fashion-MNIST at 64x64 on this machine.

    python benchmarks/time_to_quality.py [--budget 240] [hydra overrides of cvae's run ...]

1. The reference, written out below as tutorials write it: two stride-2 Conv2d layers (32
   and 64 channels), Linear to `mu` and `log_var`, Linear then two ConvTranspose2d back,
   Sigmoid; squared error summed over pixels + KL; Adam 1e-3; batch 64; torchvision
   `ImageFolder` over the training images as PNG files (written once under /tmp), resized
   to 64x64 by the loader's workers. It trains for `--budget` seconds of wall time.
2. Its test loss per image is measured on a fixed subset of the official test split.
3. `python -m cvae.train`'s default configuration (Fashion-MNIST 64x64, latent 512, batch
   64, Adam 1e-3) then trains through the real Trainer, from a cold data cache, and the
   same loss on the same subset is measured every `--probe-every` steps with the clock
   paused, until it is at most the reference's. The ratio of the two training times is
   printed.

Both losses: squared error summed over pixels + KL, per image, one posterior sample from
a fixed seed, in eval mode.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from common import compose_train, machine
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from cvae.data.decode import Preprocess
from cvae.data.presets import load_idx_source
from cvae.models.losses import kl_divergence
from cvae.training import build

REPO = Path(__file__).resolve().parents[1]
TARGET = 3.0  # cvae's time to the reference's loss, at most a third of the reference's
IMAGE_SIZE, LATENT = 64, 512


class TextbookVAE(nn.Module):
    """The reference VAE of tutorials and courses, at 64x64 grey."""

    def __init__(self, latent_dim: int = LATENT) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, 2, 1),
            nn.ReLU(),
            nn.Flatten(),
        )
        flat = 64 * (IMAGE_SIZE // 4) ** 2
        self.mu = nn.Linear(flat, latent_dim)
        self.log_var = nn.Linear(flat, latent_dim)
        self.project = nn.Linear(latent_dim, flat)
        self.decoder = nn.Sequential(
            nn.ReLU(),
            nn.Unflatten(1, (64, IMAGE_SIZE // 4, IMAGE_SIZE // 4)),
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, 2, 1),
            nn.Sigmoid(),
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), self.log_var(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.project(z))


def loss_per_image(
    model, images: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Squared error summed over pixels + KL, averaged over the batch (one sample)."""
    mu, log_var = model.encode(images)
    eps = torch.randn(mu.shape, generator=generator).to(mu)
    x_hat = model.decode(mu + torch.exp(0.5 * log_var) * eps)
    squared_error = (x_hat - images).pow(2).flatten(1).sum(1)
    return (squared_error + kl_divergence(mu, log_var)).mean()


@torch.no_grad()
def test_loss(model, images: torch.Tensor, batch_size: int = 250) -> float:
    """The loss per image over the test subset, with eps from a fixed seed, in eval mode."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(0)
    total = 0.0
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        total += float(loss_per_image(model, batch, generator)) * len(batch)
    model.train(was_training)
    return total / len(images)


def write_pngs(images: np.ndarray, labels: np.ndarray, folder: Path) -> Path:
    """The training split as an ImageFolder tree of PNGs (written once, then reused)."""
    done = folder / ".complete"
    if done.exists():
        return folder
    for label in np.unique(labels):
        (folder / f"{label}").mkdir(parents=True, exist_ok=True)

    def write(index: int) -> None:
        Image.fromarray(images[index]).save(folder / f"{labels[index]}" / f"{index:05d}.png")

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(len(images))))
    done.touch()
    return folder


def train_reference(folder: Path, budget: float, workers: int, seed: int) -> tuple[nn.Module, int]:
    """The textbook loop for `budget` seconds of wall time: (model, images seen)."""
    torch.manual_seed(seed)
    transform = transforms.Compose(
        [transforms.Grayscale(1), transforms.Resize(IMAGE_SIZE), transforms.ToTensor()]
    )
    dataset = datasets.ImageFolder(str(folder), transform=transform)
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=workers)
    model = TextbookVAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen, started = 0, time.perf_counter()
    while True:
        for images, _ in loader:
            loss = loss_per_image(model, images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(images)
            if time.perf_counter() - started >= budget:
                return model, seen


class QualityProbe(pl.Callback):
    """Every `every` steps, pauses the clock and measures the test loss; stops the run when
    it reaches `target`. The clock starts when the Trainer starts (data cache build in it)."""

    def __init__(self, images: torch.Tensor, target: float, every: int, budget: float) -> None:
        self.images, self.target, self.every, self.budget = images, target, every, budget
        self.paused = 0.0
        self.reached: float | None = None
        self.curve: list[tuple[float, float]] = []

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started - self.paused

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every:
            return
        training_time, probe_started = self.elapsed(), time.perf_counter()
        loss = test_loss(module, self.images.to(module.device))
        self.paused += time.perf_counter() - probe_started
        self.curve.append((training_time, loss))
        if loss <= self.target and self.reached is None:
            self.reached = training_time
        if self.reached is not None or training_time > self.budget:
            trainer.should_stop = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=240.0, help="reference's seconds")
    parser.add_argument("--test-images", type=int, default=1000, help="size of the test subset")
    parser.add_argument("--probe-every", type=int, default=20, help="steps between probes")
    parser.add_argument("--workers", type=int, default=2, help="the reference's loader workers")
    parser.add_argument(
        "--data-root", default=str(REPO / "data"), help="where Fashion-MNIST's idx files are"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of cvae's training run")
    args = parser.parse_args()

    train, test = load_idx_source("fashion_mnist", args.data_root, download=False)
    preprocess = Preprocess(IMAGE_SIZE, 1)
    subset = np.stack([preprocess(test.image(i)) for i in range(args.test_images)])
    subset = torch.from_numpy(subset).float() / 255
    folder = write_pngs(
        train.images, train.labels, Path(tempfile.gettempdir()) / "cvae-bench-fashion-mnist-png"
    )
    print(f"machine: {machine()}")

    reference, seen = train_reference(folder, args.budget, args.workers, args.seed)
    target = test_loss(reference, subset)
    print(
        f"reference: {args.budget:.0f} s, {seen:,} images ({seen / args.budget:,.0f} images/s), "
        f"test loss {target:,.2f} per image"
    )

    output = Path(tempfile.mkdtemp(prefix="cvae-quality-"))
    cfg = compose_train(
        output,
        [
            f"data.root={args.data_root}",
            "data.download=false",
            f"data.cache_dir={output / 'cache'}",
            "trainer.min_epochs=0",
            "test=false",
            f"seed={args.seed}",
            *args.overrides,
        ],
    )
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    probe = QualityProbe(subset, target, args.probe_every, budget=args.budget)
    trainer.callbacks.append(probe)
    probe.start()
    trainer.fit(model, datamodule=datamodule)
    for seconds, loss in probe.curve:
        print(f"  cvae at {seconds:6.1f} s: test loss {loss:,.2f}")
    if probe.reached is None:
        print(f"cvae did not reach {target:,.2f} within {args.budget:.0f} s: ratio < 1")
        return
    ratio = args.budget / probe.reached
    print(
        f"cvae reached {target:,.2f} after {probe.reached:.1f} s of training "
        f"(data cache build included)"
    )
    print(f"time to quality: reference / cvae = {ratio:.2f}x (target >= {TARGET:.0f}x)")


if __name__ == "__main__":
    main()
