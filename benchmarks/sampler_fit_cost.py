"""What the end-of-training mixture fit costs and buys: fit time against sample quality.

    python benchmarks/sampler_fit_cost.py --checkpoint RUN/checkpoints/last.ckpt \\
        --features outputs/features/<time>/features.pt [--samples 5000]

Encodes the checkpoint's training images once (timed), then fits `sampler=gmm` for each row
of a grid of images used (all, or the first N: 1,000 stands for a small folder), principal
dimensions, components and covariance; times each fit and scores its samples by the Frechet
distance of `--samples` of them to as many test images in the features of `--features` (a
`cvae.train_features` classifier of the same data). The first row is today's default, the
baseline of the ratios (`--rows 0 5 3`: those rows only, the first the baseline). Prints a
Markdown table with the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import machine

# images (None: all), dims, components, covariance; the first is conf/sampler/gmm.yaml's
GRID = [
    (None, 64, 100, "full"),
    (None, 32, 100, "full"),
    (None, 64, 50, "full"),
    (None, 32, 50, "full"),
    (None, 64, 100, "diag"),
    (20_000, 64, 100, "full"),
    (10_000, 64, 100, "full"),
    (10_000, 32, 50, "full"),
    (1_000, 64, 100, "full"),
    (1_000, 32, 10, "full"),
    (1_000, 64, 100, "diag"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--rows", type=int, nargs="*", help="rows of GRID to run (default: all)")
    args = parser.parse_args()

    from cvae import CVAE, ImageDataModule
    from cvae.fid import feature_network, sample_quality
    from cvae.samplers import GaussianMixtureSampler, posteriors

    model = CVAE.load_from_checkpoint(args.checkpoint, map_location="cpu", weights_only=True)
    model.eval()
    datamodule = ImageDataModule.load_from_checkpoint(args.checkpoint, num_workers=0)
    started = time.perf_counter()
    posterior, _ = posteriors(model, datamodule.ordered_dataloader("train"))
    encode_seconds = time.perf_counter() - started
    hp = model.hparams
    extractor = feature_network(args.features, hp.in_channels, hp.image_size)
    test = datamodule.ordered_dataloader("test")
    print(f"machine: {machine()}")
    print(
        f"checkpoint: {args.checkpoint}; {len(posterior.mu):,} training means of "
        f"{posterior.mu.shape[1]} dims encoded in {encode_seconds:.0f} s; FD of "
        f"{args.samples:,} samples to {args.samples:,} test images"
    )
    print("| images | dims | components | covariance | parameters | fit (s) | vs default | FD |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = None
    rows = [GRID[i] for i in args.rows] if args.rows else GRID
    for images, dims, components, covariance in rows:
        sampler = GaussianMixtureSampler(components, covariance, dims)
        used = len(posterior.mu) if images is None else images
        started = time.perf_counter()
        sampler.fit(posterior.mu[:used], posterior.log_var[:used])
        seconds = time.perf_counter() - started
        baseline = baseline or seconds
        quality = sample_quality(
            model, test, args.samples, extractor=extractor, sampler=sampler, batch_size=250
        )
        parameters = sampler.parameters(min(components, used), min(dims, hp.latent_dim))
        print(
            f"| {used:,} | {dims} | {components} | {covariance} | {parameters:,} | "
            f"{seconds:.0f} | {seconds / baseline:.2f}x | {quality['fid']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
