"""What the `experiment=fashion_mnist_nll` variants cost, and how far their runs got.

    python benchmarks/nll_variants.py [--steps 30] [--threads 1] [--runs DIR ...]

For every variant (overrides of the experiment) it builds the model as `cvae.train` does and
prints its parameters, its training FLOPs per image (forward and backward, every importance
sample) and the time of a training step of batch 100, measured here as a ratio of the
baseline's, measured in the same process; an epoch is 500 steps. With `--runs`, it reads each
run folder's TensorBoard events and prints its `val/iw_nll` curve (K=100, the first 2,000
validation images) against the training time: the variants table and curves of
docs/reports/density-estimation.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import compose_train, machine, training_flops
from hydra.utils import instantiate

BASELINE = ["model.iw_samples=1", "model.latent_dim=40", "model.kernel_size=4"]
VARIANTS = {
    "baseline (ELBO, latent 40, 4x4 kernels)": [],
    "IWAE k=5": ["model.iw_samples=5"],
    "IWAE k=5, latent 64, 5x5 kernels": [
        "model.iw_samples=5",
        "model.latent_dim=64",
        "model.kernel_size=5",
    ],
    "IWAE k=5, VampPrior (500 pseudo-inputs)": ["model.iw_samples=5", "model/prior=vamp"],
    "IWAE k=5, mixture prior (10 components)": ["model.iw_samples=5", "model/prior=mog"],
    "ELBO, widths 64-128, a residual block per resolution": [
        "model.hidden_channels=[64,128]",
        "model.residual_blocks=1",
    ],
    "IWAE k=5, two levels (model=convhvae: 40 + 40)": ["model=convhvae", "model.iw_samples=5"],
    "IWAE k=5, two levels, VampPrior on the top": [
        "model=convhvae",
        "model.iw_samples=5",
        "model/prior=vamp",
    ],
    "IWAE k=5, two levels, VampPrior (100 pseudo-inputs) on the top": [
        "model=convhvae",
        "model.iw_samples=5",
        "model/prior=vamp",
        "model.prior_components=100",
    ],
}


def step_seconds(model: torch.nn.Module, batch: torch.Tensor, steps: int) -> float:
    """Mean seconds of a training step (loss, backward, Adam) after three warm-up steps."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    for index in range(steps + 3):
        if index == 3:
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.loss_terms(batch)["loss"].backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def costs(steps: int) -> None:
    print(f"machine: {machine()}; {steps} timed steps of batch 100 per variant\n")
    print("| variant | parameters | training MFLOP per image | step time | epoch (500 steps) |")
    print("|---|---|---|---|---|")
    batch = (torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    baseline = None
    with tempfile.TemporaryDirectory() as scratch:
        for name, overrides in VARIANTS.items():
            cfg = compose_train(
                Path(scratch), ["experiment=fashion_mnist_nll", *BASELINE, *overrides]
            )
            torch.manual_seed(0)
            model = instantiate(cfg.model)
            params = sum(p.numel() for p in model.parameters())
            flops = training_flops(model, batch, lambda m, b: m.loss_terms(b)["loss"])
            seconds = step_seconds(model, batch, steps)
            baseline = baseline or seconds
            print(
                f"| {name} | {params / 1e6:.2f}M | {flops / 1e6:.1f} | "
                f"{seconds * 1e3:.0f} ms ({seconds / baseline:.2f}x) | "
                f"{seconds * 500:.0f} s |",
                flush=True,
            )


def training_minutes(wall_times: list[float]) -> list[float]:
    """Minutes of training at each validation, from their wall clock times: a gap over three
    times the median epoch (a stop and a resume) counts as one median epoch, as does the first."""
    gaps = [b - a for a, b in zip(wall_times, wall_times[1:], strict=False)]
    median = sorted(gaps)[len(gaps) // 2] if gaps else 0.0
    total, minutes = median, [median / 60]
    for gap in gaps:
        total += gap if gap < 3 * median else median
        minutes.append(total / 60)
    return minutes


def curves(runs: list[Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in runs:
        accumulator = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "val/iw_nll" not in accumulator.Tags()["scalars"]:
            print(f"\n{run}: no val/iw_nll logged")
            continue
        validations = accumulator.Scalars("val/loss")
        times = training_minutes([v.wall_time for v in validations])
        minutes = dict(zip((v.step for v in validations), times, strict=True))
        points = accumulator.Scalars("val/iw_nll")
        print(
            f"\n{run}: {len(validations)} epochs, {minutes[validations[-1].step]:.0f} min; "
            "val/iw_nll (K=100) against training time"
        )
        for point in points:
            print(
                f"  step {point.step:6d}  {minutes.get(point.step, float('nan')):6.1f} min  "
                f"{point.value:.2f}"
            )
        print(f"  best {min(p.value for p in points):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (runs used 1)")
    parser.add_argument("--runs", type=Path, nargs="*", default=[], help="run folders to read")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.runs:
        curves(args.runs)
    else:
        costs(args.steps)


if __name__ == "__main__":
    main()
