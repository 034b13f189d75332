"""What the stability guards would do in a run: gradient norms, spikes, and the EMA's gain.

    python benchmarks/stability.py [--minutes 10] [--decay 0.999] \
        [hydra overrides ...]          # default: experiment=icons model=deep_hvae

Trains the model the overrides compose (as `python -m cvae.train` would build it, on its
data module's training split, batch and seed) in a bare loop for `--minutes`, with no guard
on, and records every step's total gradient norm. Prints their distribution, how often an
update's norm is more than 5, 10 and 100 times its running level (the exponential average
`model.skip_updates_above` keeps: what it would have skipped) and how often it passes the
absolute clipping thresholds 50, 200 and 1000 (`trainer.gradient_clip_val`); then the
validation loss (negative ELBO at the final beta, nats per image) of the live weights and
of an exponential moving average of them (`torch.optim.swa_utils.AveragedModel`, the
decay of `callbacks=ema`), measured in this process on the same images. The guards' defaults
in docs/models.md ("Stability") come from its output.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from common import compose_train, machine
from hydra.utils import instantiate
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

SKIP_WARMUP, SKIP_MOMENTUM = 100, 0.01  # as cvae.models.cvae's running level


def _validation_loss(model: torch.nn.Module, loader) -> float:
    model.eval()
    total, count = 0.0, 0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for images, _ in loader:
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            terms = model.loss_terms(images)
            total += float(terms["recon"] + terms["kl"]) * len(images)
            count += len(images)
    model.train()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--decay", type=float, default=0.999, help="the EMA's decay")
    parser.add_argument("overrides", nargs="*", default=["experiment=icons", "model=deep_hvae"])
    args = parser.parse_args()
    cfg = compose_train("/nonexistent", args.overrides)
    torch.manual_seed(cfg.seed)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=model.hparams.lr)
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.decay))
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"model: {' '.join(args.overrides)}; {args.minutes:g} minutes, no guard on")

    norms: list[float] = []
    levels: list[float] = []  # the running level each norm is compared with
    level, deadline = 0.0, time.perf_counter() + 60 * args.minutes
    step = 0
    while time.perf_counter() < deadline:
        for images, _ in datamodule.train_dataloader():
            loss = model.loss_terms(images)["loss"]  # at model.beta: no warm-up here
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads))
            norms.append(norm)
            levels.append(level)
            level = norm if step == 0 else level + SKIP_MOMENTUM * (norm - level)
            optimizer.step()
            average.update_parameters(model)
            step += 1
            if time.perf_counter() >= deadline:
                break

    tensor = torch.tensor(norms)
    if step <= SKIP_WARMUP:
        raise SystemExit(f"{step} steps: too few to measure spikes (give more --minutes)")
    ratios = torch.tensor(norms[SKIP_WARMUP:]) / torch.tensor(levels[SKIP_WARMUP:])
    quantiles = torch.quantile(tensor, torch.tensor([0.5, 0.99, 0.999]))
    print(
        f"{step} steps; gradient norm median {quantiles[0]:.3g}, 99th percentile "
        f"{quantiles[1]:.3g}, 99.9th {quantiles[2]:.3g}, max {tensor.max():.3g} (step "
        f"{int(tensor.argmax())}); largest ratio to the running level after the first "
        f"{SKIP_WARMUP} steps {ratios.max():.2f}"
    )
    for factor in (5, 10, 100):
        print(f"  over {factor}x the running level: {int((ratios > factor).sum())} steps")
    for threshold in (50, 200, 1000):
        print(f"  over {threshold} (clipping there): {int((tensor > threshold).sum())} steps")
    loader = datamodule.val_dataloader()
    live = _validation_loss(model, loader)
    averaged = _validation_loss(average.module, loader)
    print(
        f"validation negative ELBO (nats per image): live weights {live:.1f}, EMA "
        f"(decay {args.decay}) {averaged:.1f}: {averaged - live:+.1f}"
    )


if __name__ == "__main__":
    main()
