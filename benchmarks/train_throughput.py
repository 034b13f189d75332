"""Steady-state training images/s of cvae's default model and of its `transpose` decoder
side by side, how much of the machine each uses, and what Lightning costs over a bare
PyTorch loop.

    python benchmarks/train_throughput.py [--steps 40] [--rounds 2] [--upsample resize transpose]
        [--ablation] [hydra overrides ...]
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed \
        --channels-last --compile --on-device --epoch-images 162770

Everything runs in this one process: the machine's dense matmul rate (fp32, or bf16 with a
bf16 precision), the FLOPs of one training step per image (`torch.utils.flop_counter`,
forward and backward), then the same configuration trained through the real `Trainer` and
`ImageDataModule` (logging, progress bar, checkpoint and image callbacks included) and in
a bare loop (`loss.backward(); optimizer.step()` over the same data loader), once per
`--upsample` decoder (the default's `resize` and the former default's `transpose`: the
ratios are to `transpose` in this process, where load and clocks are the same), alternating
for `--rounds` rounds and keeping each one's best (the machine may be shared: the load
average is printed). Images/s are timed over `--steps` steps after `--warmup` steps, inside
one epoch; utilisation is achieved FLOP/s over the matmul rate. `--ablation` also times the
bare loop for each design choice of the default model (docs/reports/training-speed.md's
table).
`--epoch-images N` then times one whole epoch of N synthetic images through the Trainer
(CelebA's training split: 162,770).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
from common import compose_train, machine, matmul_rate, synchronize, training_flops
from hydra.utils import instantiate

from cvae.models.networks import UPSAMPLING
from cvae.training import build

# On the 2-core reference machine; `resize_vs_transpose` in Lightning images/s (issue 32).
TARGETS = {"utilisation": 0.40, "lightning_vs_bare": 0.90, "resize_vs_transpose": 0.90}

# Design choices of the default model, each row adding one to the row before; the last
# row is an option, not the default. Overrides are relative to conf/model/cvae.yaml.
SEED_LAYOUT = [
    "model.hidden_channels=[32,64,128,256]",
    "model.batch_norm=true",
    "model.optimizer.fused=false",
]
ABLATION = [
    ("seed layout: widths 32-64-128-256, kernel 4, BatchNorm, Adam", SEED_LAYOUT),
    ("BatchNorm off", SEED_LAYOUT[::2]),
    ("widths 16-32-64-128", SEED_LAYOUT[2:]),
    ("fused Adam: the default", []),
    ("+ channels-last layout (model.channels_last=true)", ["model.channels_last=true"]),
]


class Clock(pl.Callback):
    """Times training steps `warmup` to `warmup + steps`: two device syncs in all."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.first, self.last, self.device = warmup, warmup + steps, device
        self.seconds = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.first:
            synchronize(self.device)
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.last:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.started


def overrides(args: argparse.Namespace, images: int) -> list[str]:
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    return [
        "data=synthetic",
        f"data.synthetic_images={images}",
        f"data.image_size={args.image_size}",
        f"data.channels={args.channels}",
        f"data.batch_size={args.batch_size}",
        f"data.on_device={str(args.on_device).lower()}",
        f"data.cache_dir={args.cache_dir}",
        "data.val_fraction=0.01",
        "data.test_fraction=0.01",
        f"model.compile={str(args.compile).lower()}",
        *(["model.channels_last=true"] if args.channels_last else []),
        f"trainer.accelerator={accelerator}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        "+trainer.num_sanity_val_steps=0",
        "test=false",
        *args.overrides,
    ]


def autocast(device: torch.device, precision: str):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def loss_of(model, images: torch.Tensor) -> torch.Tensor:
    return model.loss_terms(images)["loss"]


def bare_loop(cfg, args: argparse.Namespace, device: torch.device) -> tuple[float, float]:
    """(images/s, FLOPs per image) of the configured model trained in plain PyTorch."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = instantiate(cfg.model).to(device)
    model.setup("fit")  # what the Trainer would call: layout and compilation
    optimizer = model.configure_optimizers()["optimizer"]
    loader = datamodule.train_dataloader()
    first = next(iter(loader))[0].to(device)
    with autocast(device, args.precision):
        flops = training_flops(model, first, loss_of)
    started = 0.0
    for done, (images, _) in enumerate(loader):
        if done == args.warmup:
            synchronize(device)
            started = time.perf_counter()
        images = images.to(device, non_blocking=True)
        with autocast(device, args.precision):
            loss = loss_of(model, images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if done + 1 == args.warmup + args.steps:
            break
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - started), flops


def lightning_loop(cfg, args: argparse.Namespace, device: torch.device) -> float:
    """Images/s of the configured run through the Trainer, as `python -m cvae.train` runs it."""
    cfg.trainer.max_steps = args.warmup + args.steps + 1
    datamodule, model, trainer = build(cfg)
    clock = Clock(args.warmup, args.steps, device)
    trainer.callbacks.append(clock)
    trainer.fit(model, datamodule=datamodule)
    return args.steps * args.batch_size / clock.seconds


def decoder_rates(
    args: argparse.Namespace, device: torch.device, images: int, output: Path
) -> dict[str, dict[str, float]]:
    """Per `--upsample` decoder: the best bare and Lightning images/s of `--rounds`
    alternating rounds, and the training FLOPs per image."""
    rates = {name: {"bare": 0.0, "Lightning": 0.0} for name in args.upsample}
    for round_ in range(args.rounds):
        for name, rate in rates.items():
            settings = [*overrides(args, images), f"model.upsample={name}"]
            folder = output / f"{name}-{round_}"
            bare, rate["flops"] = bare_loop(compose_train(folder / "bare", settings), args, device)
            lightning = lightning_loop(compose_train(folder / "trainer", settings), args, device)
            rate["bare"] = max(rate["bare"], bare)
            rate["Lightning"] = max(rate["Lightning"], lightning)
    return rates


def epoch_time(args: argparse.Namespace, device: torch.device, output: Path) -> float:
    """Seconds of one training epoch over `--epoch-images` synthetic images (no validation)."""
    images = args.epoch_images
    cfg = compose_train(output / "epoch", overrides(args, images))
    cfg.trainer.max_epochs, cfg.trainer.limit_val_batches = 2, 0
    datamodule, model, trainer = build(cfg)
    seconds: list[float] = []

    class EpochClock(pl.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            synchronize(device)
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            synchronize(device)
            seconds.append(time.perf_counter() - self.started)

    trainer.callbacks.append(EpochClock())
    trainer.fit(model, datamodule=datamodule)
    return seconds[-1]  # the second epoch: compilation and caches warm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="model.compile=true")
    parser.add_argument("--on-device", action="store_true", help="data.on_device=true")
    parser.add_argument("--epoch-images", type=int, default=0, help="also time one epoch")
    parser.add_argument("--ablation", action="store_true", help="bare loop per design choice")
    parser.add_argument(
        "--upsample",
        nargs="+",
        default=["resize", "transpose"],
        choices=UPSAMPLING,
        help="decoders to time (ratios to transpose)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternating timed rounds")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "cvae-bench"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = int((args.warmup + args.steps + 2) * args.batch_size / 0.98) + 1
    low_precision = args.precision.startswith(("bf16", "16"))
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(args.precision.split("-")[0])
    peak = matmul_rate(device, dtype if low_precision else torch.float32)

    print(f"machine: {machine()}")
    kind = dtype if low_precision else "fp32"
    print(f"dense matmul rate ({kind}): {peak / 1e9:,.1f} GFLOP/s")
    output = Path(tempfile.mkdtemp(prefix="cvae-throughput-"))
    load_before = os.getloadavg()
    rates = decoder_rates(args, device, images, output)
    load_after = os.getloadavg()
    baseline = rates.get("transpose")
    print(
        f"load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} on "
        f"{os.cpu_count()} cores (above {torch.get_num_threads()}: shared)"
    )
    print(
        f"model: {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}, "
        f"{args.precision}; best of {args.rounds} alternating rounds"
    )
    print(
        "\n| upsample | loop | MFLOP/image, fwd + bwd | images/s | GFLOP/s | of matmul | "
        "/ transpose |\n|---|---|---|---|---|---|---|"
    )
    for name, rate in rates.items():
        for loop in ("bare", "Lightning"):
            achieved = rate[loop] * rate["flops"]
            ratio = f"{rate[loop] / baseline[loop]:.2f}x" if baseline else "-"
            print(
                f"| {name} | {loop} | {rate['flops'] / 1e6:,.1f} | {rate[loop]:,.0f} | "
                f"{achieved / 1e9:.1f} | {achieved / peak:.1%} | {ratio} |"
            )
    print()
    for name, rate in rates.items():
        utilisation = rate["Lightning"] * rate["flops"] / peak
        print(
            f"{name}: Lightning / bare loop {rate['Lightning'] / rate['bare']:.2f}x (target >= "
            f"{TARGETS['lightning_vs_bare']}x); utilisation {utilisation:.1%} (target >= "
            f"{TARGETS['utilisation']:.0%} on CPU)"
        )
    if baseline and "resize" in rates:
        ratio = rates["resize"]["Lightning"] / baseline["Lightning"]
        target = TARGETS["resize_vs_transpose"]
        print(f"resize / transpose (Lightning images/s): {ratio:.2f}x (target >= {target}x)")

    if args.ablation:
        print("\n| choice | images/s | utilisation |\n|---|---|---|")
        for name, extra in ABLATION:
            cfg = compose_train(output / "ablation", overrides(args, images) + extra)
            rate, choice_flops = bare_loop(cfg, args, device)
            print(f"| {name} | {rate:,.0f} | {rate * choice_flops / peak:.1%} |", flush=True)

    if args.epoch_images:
        seconds = epoch_time(args, device, output)
        print(
            f"one epoch of {args.epoch_images:,} images: {seconds:.2f} s "
            f"({args.epoch_images / seconds:,.0f} images/s)"
        )


if __name__ == "__main__":
    main()
