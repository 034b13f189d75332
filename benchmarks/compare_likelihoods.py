"""The four decoder likelihoods at equal training budget on Fashion-MNIST at 64x64.

    python benchmarks/compare_likelihoods.py [--steps 600] [--eval-images 1000] [--iw-samples 100]

Trains the default model once per `model.recon_loss` for the same number of steps (same seed,
same data order), evaluates each on the first test images, prints a Markdown table and saves a
grid of samples per likelihood under docs/likelihoods/.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
LIKELIHOODS = ("bernoulli", "gaussian_fixed", "gaussian_learned", "gaussian_optimal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per likelihood")
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "compare_likelihoods")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "likelihoods")
    args = parser.parse_args()

    from cvae import CVAE, ImageDataModule, visualize_batch
    from cvae.metrics import evaluate_model
    from cvae.training import train

    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; {args.steps} steps of batch 64 each"
    )
    rows = []
    for name in LIKELIHOODS:
        run_dir = args.out / name
        overrides = [
            f"paths.output_dir={run_dir}",
            f"model.recon_loss={name}",
            "test=false",
            "sampler=prior",  # its grids are prior samples; no fit at the end
            f"trainer.max_steps={args.steps}",
            "trainer.max_epochs=-1",
            "trainer.limit_val_batches=10",
            f"+trainer.val_check_interval={args.steps}",
            "trainer.check_val_every_n_epoch=null",  # validate once, at the end
            "~callbacks.rich_progress_bar",
            "+trainer.enable_progress_bar=false",
        ]
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
        started = time.perf_counter()
        train(cfg)
        seconds = time.perf_counter() - started
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        model = CVAE.load_from_checkpoint(checkpoint, weights_only=True).eval()
        datamodule = ImageDataModule.load_from_checkpoint(checkpoint)
        datamodule.setup("test")
        metrics = evaluate_model(
            model,
            datamodule.test_dataloader(),
            iw_samples=args.iw_samples,
            max_images=args.eval_images,
        )
        samples = model.sample(64, generator=torch.Generator().manual_seed(0))
        visualize_batch(samples, args.docs / f"{name}_samples.png", nrow=8)
        sigma = ""
        if hasattr(model.likelihood, "log_sigma"):
            sigma = f"{float(model.likelihood.log_sigma.exp()):.3f}"
        elif hasattr(model.likelihood, "sigma"):
            sigma = f"{model.likelihood.sigma:.3f}"
        rows.append((name, seconds, metrics, sigma))
        print(f"{name}: trained in {seconds:.0f} s", flush=True)

    print(
        f"\n{args.steps} steps each, test metrics on the first {args.eval_images} test images, "
        f"NLL with {args.iw_samples} importance samples\n"
    )
    print(
        "| likelihood | sigma | test bits/dim | MSE per pixel | PSNR | SSIM | active units | "
        "train time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, seconds, m, sigma in rows:
        bpd = (
            "n/a: not a density of 8-bit data"
            if name == "bernoulli"
            else f"{m['bits_per_dim']:.3f}"
        )
        units = f"{m['active_units']} / {m['latent_dim']}"
        cells = [
            f"`{name}`",
            sigma or "-",
            bpd,
            f"{m['mse_per_pixel']:.4f}",
            f"{m['psnr']:.2f}",
            f"{m['ssim']:.3f}",
            units,
            f"{seconds:.0f} s",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
