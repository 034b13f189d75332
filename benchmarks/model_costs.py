"""What a training step of each model preset costs: parameters, FLOPs, time per step.

    python benchmarks/model_costs.py [--models cvae hvae hvae_maps deep_hvae] \
        [--images 32x1 64x3] [--steps 6] [--rounds 2] [hydra overrides ...]

Builds each `model=<preset>` as `python -m cvae.train` composes it, for images of each
`--images` size and channel count, and times a training step of batch 64 (forward,
backward, Adam) on random images, `--steps` steps after two untimed ones, alternating the
models for `--rounds` rounds and keeping each one's best (the machine may be shared: the
load average is printed). Ratios are to the first model at the same image size, timed in
this process. docs/models.md's cost table is its output.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import compose_train, machine, training_flops
from hydra.utils import instantiate


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return model.loss_terms(batch)["loss"]


def _step_seconds(model: torch.nn.Module, batch: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for index in range(steps + 2):
        if index == 2:
            started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        _loss(model, batch).backward()
        optimizer.step()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["cvae", "hvae", "hvae_maps", "deep_hvae"])
    parser.add_argument("--images", nargs="+", default=["32x1", "64x3"], help="SIZExCHANNELS")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every model")
    args = parser.parse_args()
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print("| model | images | parameters | training MFLOP/image | ms per step | vs first |")
    print("|---|---|---|---|---|---|")
    for images in args.images:
        size, channels = (int(part) for part in images.split("x"))
        models, batch = {}, torch.rand(64, channels, size, size)
        for name in args.models:
            cfg = compose_train(
                "/nonexistent",
                [f"model={name}", f"data.image_size={size}", f"data.channels={channels}"]
                + args.overrides,
            )
            torch.manual_seed(0)
            models[name] = instantiate(cfg.model).train()
        best = dict.fromkeys(models, float("inf"))
        for _ in range(args.rounds):
            for name, model in models.items():
                best[name] = min(best[name], _step_seconds(model, batch, args.steps))
        first = best[args.models[0]]
        for name, model in models.items():
            parameters = sum(p.numel() for p in model.parameters())
            flops = training_flops(model, batch, _loss)
            print(
                f"| `{name}` | {size}x{size}x{channels} | {parameters / 1e6:.2f}M | "
                f"{flops / 1e6:.1f} | {best[name] * 1000:.0f} | {best[name] / first:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
