"""The decoder likelihoods compared at an equal training budget: steps, or wall time.

    python benchmarks/compare_likelihoods.py [--steps 600] [--eval-images 1000] [--iw-samples 100]
    python benchmarks/compare_likelihoods.py --data icons --minutes 10 \
        --likelihoods gaussian_fixed gaussian_optimal logistic_mixture \
        --fid-features outputs/features/<time>/features.pt --set model.latent_dim=128

Trains the default model once per `model.recon_loss` (same seed, same data order) for the
same number of steps (`--steps`) or the same wall time (`--minutes`, `trainer.max_time`: a
likelihood whose steps cost more takes fewer of them), then evaluates each checkpoint with
`cvae.evaluate` on the first `--eval-images` test images (bits/dim, MSE, PSNR, SSIM, active
units; for colour data each channel's mean absolute error and the colour distance of the
reconstructions) and, with `--fid-features` (a `cvae.train_features` file), the Frechet
distance (FD) in those features of `--fid-samples` samples from `--sampler` (fitted to the
training images when training ends, as `cvae.train` does) to the test images, beside two
references in the same features: the training images and the test images' reconstructions.
`--checkpoint best` evaluates each run's best checkpoint by val/loss instead of last.ckpt
(early stopping, for small data sets), fitting the sampler to it first; `--evaluate-only`
evaluates the runs an earlier call trained into `--out`.

Prints a Markdown table with the machine, threads, date and times (also written to
`--out/table-<last|best>.md`), and saves pictures per likelihood under `--docs`:
`<likelihood>_samples.png` (the decoder's means of `--sampler` latents, as
`cvae.generate mode=sample` draws them), and with `--reconstructions`
`<likelihood>_reconstructions.png` (test images in odd rows, their reconstructions below) and
`<likelihood>_draws.png` (the samples' latents, pixels drawn from p(x | z): for the
likelihoods whose draws are not their means); `<likelihood>_best_*` for `--checkpoint best`.
Each run lands in `--out/<likelihood>/`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import time
from pathlib import Path

import torch
from common import CONF_DIR, machine
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
LIKELIHOODS = ("bernoulli", "gaussian_fixed", "gaussian_learned", "gaussian_optimal")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion_mnist", help="a conf/data/ option")
    parser.add_argument("--likelihoods", nargs="+", default=list(LIKELIHOODS))
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=600, help="training steps per likelihood")
    budget.add_argument(
        "--minutes", type=float, help="wall time per likelihood (trainer.max_time), not steps"
    )
    parser.add_argument("--eval-images", type=int, default=1000, help="first test images")
    parser.add_argument("--iw-samples", type=int, default=100)
    parser.add_argument(
        "--sampler", default="prior", help="latents of the samples and FD: prior, gmm, two_stage"
    )
    parser.add_argument("--fid-features", type=Path, help="cvae.train_features' features.pt")
    parser.add_argument("--fid-samples", type=int, default=1000)
    parser.add_argument(
        "--reconstructions", action="store_true", help="also save reconstructions and draws"
    )
    parser.add_argument(
        "--checkpoint",
        choices=("last", "best"),
        default="last",
        help="evaluate last.ckpt (the budget's end) or the best by val/loss (early stopping); "
        "best: the sampler is fitted to it first, its pictures named <likelihood>_best_*",
    )
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="evaluate the runs an earlier call trained into --out, without training",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="more Hydra overrides, for all"
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "compare_likelihoods")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "likelihoods")
    return parser.parse_args()


def composed(config: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config, overrides=overrides)


def budget_overrides(args: argparse.Namespace) -> list[str]:
    """Equal steps (validated once, at the end), or equal wall time (validated every 25
    epochs: the run's last validation writes the last.ckpt that is evaluated)."""
    if args.minutes is None:
        return [
            f"trainer.max_steps={args.steps}",
            "trainer.max_epochs=-1",
            "trainer.limit_val_batches=10",
            f"+trainer.val_check_interval={args.steps}",
            "trainer.check_val_every_n_epoch=null",
        ]
    seconds = round(args.minutes * 60)
    clock = f"00:{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return [
        f"trainer.max_time={clock}",
        "trainer.max_steps=-1",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=25",
    ]


def train_one(args: argparse.Namespace, name: str) -> tuple[Path, dict]:
    """Train one likelihood (its sampler fitted at the end; with `--evaluate-only`, the run
    already in `--out`); the checkpoint to evaluate and result.json."""
    from cvae.training import train

    run_dir = args.out / name
    if not args.evaluate_only:
        train(composed("train", train_overrides(args, name, run_dir)))
    result = json.loads((run_dir / "result.json").read_text())
    last = run_dir / "checkpoints" / "last.ckpt"
    if args.checkpoint == "last" or Path(result["checkpoint"]).name == last.name:
        return last, result
    best = Path(result["checkpoint"])
    from cvae.generation import generate  # fit the sampler to it, as training fits last.ckpt

    generate(generate_config(args, best, "fit", run_dir / "generate" / "fit"))
    return best, result


def train_overrides(args: argparse.Namespace, name: str, run_dir: Path) -> list[str]:
    return [
        f"paths.output_dir={run_dir}",
        f"data={args.data}",
        f"model.recon_loss={name}",
        "test=false",
        f"sampler={args.sampler}",
        *budget_overrides(args),
        "~callbacks.rich_progress_bar",
        "+trainer.enable_progress_bar=false",
        *args.set,
    ]


def sampler_overrides(args: argparse.Namespace) -> list[str]:
    """The `--set sampler.*` settings, for the tools that load the fit."""
    return [f"sampler={args.sampler}", *(o for o in args.set if o.startswith("sampler."))]


def evaluate_one(args: argparse.Namespace, checkpoint: Path) -> dict:
    """`cvae.evaluate` of `checkpoint` on the test split; FD with `--fid-features`."""
    from cvae.evaluation import evaluate_checkpoint

    overrides = [
        f"ckpt_path={checkpoint}",
        f"paths.output_dir={checkpoint.parents[1] / 'eval'}",
        "eval.split=test",
        f"eval.iw_samples={args.iw_samples}",
        f"eval.max_images={args.eval_images}",
        "eval.progress=false",
        *sampler_overrides(args),
    ]
    if args.fid_features:
        overrides += [
            "eval.fid=true",
            f"eval.fid_features={args.fid_features.resolve()}",
            f"eval.fid_samples={args.fid_samples}",
        ]
    return evaluate_checkpoint(composed("eval", overrides))


def generate_config(args: argparse.Namespace, checkpoint: Path, mode: str, out: Path):
    """`cvae.generate`'s config for `mode` of `checkpoint`, with the benchmark's sampler."""
    overrides = [f"ckpt_path={checkpoint}", f"mode={mode}", f"paths.output_dir={out}"]
    overrides += [f"n={32 if mode == 'reconstruct' else 64}", *sampler_overrides(args)]
    return composed("generate", overrides)


def pictures(args: argparse.Namespace, name: str, checkpoint: Path) -> None:
    """`cvae.generate`'s samples (and reconstructions of 32 test images), copied to
    `--docs`; with `--reconstructions` also pixels drawn from p(x | z) at the samples'
    latents."""
    from cvae import visualize_batch
    from cvae.generation import generate
    from cvae.loading import load_checkpoint, sampler

    args.docs.mkdir(parents=True, exist_ok=True)
    stem = name if args.checkpoint == "last" else f"{name}_best"
    modes = {"sample": "samples", "reconstruct": "reconstructions"}
    for mode, picture in modes.items():
        if mode == "reconstruct" and not args.reconstructions:
            continue
        out = checkpoint.parents[1] / "generate" / f"{checkpoint.stem}-{mode}"
        cfg = generate_config(args, checkpoint, mode, out)
        generate(cfg)
        shutil.copy(out / f"{picture}.png", args.docs / f"{stem}_{picture}.png")
    if args.reconstructions:  # the same latents as `mode=sample` (seed 0), drawn in pixels
        model, _ = load_checkpoint(cfg)
        fitted = sampler(cfg).loaded_for(checkpoint)
        latents = fitted.latents(model, 64, torch.Generator().manual_seed(0))
        with torch.inference_mode():
            logits = model.decode_logits(latents.to(model.device))
            draws = model.likelihood.sample(logits, generator=torch.Generator().manual_seed(0))
            noisy = not torch.equal(draws, model.decoder.images(logits))
        if noisy:  # the Gaussians' draws are their means here: the samples' grid
            visualize_batch(draws.cpu(), args.docs / f"{stem}_draws.png", nrow=8)


def mean_batch(checkpoint: Path) -> float:
    """Training images per step: an epoch's images over its steps (the last batch of an
    epoch is smaller)."""
    from cvae.loading import load_checkpoint

    _, datamodule = load_checkpoint(composed("eval", [f"ckpt_path={checkpoint}"]))
    datamodule.setup("fit")
    return len(datamodule.train_set) / len(datamodule.train_dataloader())


def steps_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]


def sigma_of(checkpoint: Path) -> str:
    """The Gaussians' sigma after training ('' for the others)."""
    from cvae import CVAE

    likelihood = CVAE.load_from_checkpoint(checkpoint, weights_only=True).likelihood
    if hasattr(likelihood, "log_sigma"):
        return f"{float(likelihood.log_sigma.exp()):.3f}"
    if hasattr(likelihood, "sigma"):
        return f"{float(likelihood.sigma):.3f}"
    return ""


def references(args: argparse.Namespace, checkpoint: Path) -> dict[str, float]:
    """FD floors in the same features: real training images, and the test images'
    reconstructions by `checkpoint`'s model, each against the test images that the
    samples' FD takes (the first `--fid-samples`)."""
    from cvae.fid import feature_network, fid_kid
    from cvae.loading import load_checkpoint

    model, datamodule = load_checkpoint(composed("eval", [f"ckpt_path={checkpoint}"]))
    datamodule.setup("fit")
    datamodule.setup("test")
    features = feature_network(args.fid_features)

    def first(split: str, count: int) -> torch.Tensor:
        images = torch.cat([b for b, _ in datamodule.ordered_dataloader(split)])
        return images[:count]

    test = first("test", args.fid_samples)
    train = first("train", args.fid_samples)
    with torch.inference_mode():
        recon = torch.cat([model.reconstruct(b.to(model.device)).cpu() for b in test.split(64)])
    return {
        "train": fid_kid([test], [train], features)["fid"],
        "reconstructions": fid_kid([test], [recon], features)["fid"],
    }


def table(rows: list[dict], colour: bool, fid: bool) -> list[str]:
    """The Markdown table of the rows; colour and FD columns when measured."""
    head = ["likelihood", "sigma", "steps", "images/s", "test bits/dim", "MSE per pixel", "PSNR"]
    head += ["SSIM", "active units"]
    if colour:
        head += ["MAE R / G / B (0-255)", "colour W1 recon R / G / B"]
    if fid:
        head += ["FD samples", "FD reconstructions", "colour W1 samples R / G / B"]
    head += ["train time (CPU time)", "evaluated"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        m, name = row["metrics"], row["name"]
        bpd = (
            "n/a: not a density of 8-bit data"
            if name == "bernoulli"
            else f"{m['bits_per_dim']:.3f}"
        )
        cells = [
            f"`{name}`",
            row["sigma"] or "-",
            f"{row['steps']:,}",
            f"{row['steps'] * row['batch'] / row['train_seconds']:.0f}",
            bpd,
            f"{m['mse_per_pixel']:.4f}",
            f"{m['psnr']:.2f}",
            f"{m['ssim']:.3f}",
            f"{m['active_units']} / {m['latent_dim']}",
        ]
        if colour:
            cells += [
                " / ".join(f"{v * 255:.1f}" for v in m["mae_per_channel"].values()),
                " / ".join(f"{v:.4f}" for v in m["colour_w1_reconstructions"].values()),
            ]
        if fid:
            cells += [
                f"{m['fid']:.2f}",
                f"{row['fd_reconstructions']:.2f}",
                " / ".join(f"{v:.4f}" for v in m["colour_w1_samples"].values()),
            ]
        cpu = "" if row["cpu_seconds"] is None else f" ({row['cpu_seconds']:.0f} s)"
        cells += [f"{row['train_seconds']:.0f} s{cpu}", row["checkpoint"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now()
    budget = (
        f"{args.minutes:g} minutes of training each (trainer.max_time)"
        if args.minutes is not None
        else f"{args.steps} steps each"
    )
    header = [
        f"machine: {machine()}; {started:%Y-%m-%d %H:%M}",
        f"data={args.data}, {budget}, sampler={args.sampler}, overrides: {' '.join(args.set)}; "
        f"evaluated: {args.checkpoint} checkpoint",
    ]
    print("\n".join(header), flush=True)
    rows, floors = [], {}
    for name in args.likelihoods:
        began, cpu = time.perf_counter(), time.process_time()
        checkpoint, result = train_one(args, name)
        cpu = time.process_time() - cpu  # what the run got of the machine (shared or not)
        fit = checkpoint.parents[1] / "sampler.json"
        fit_seconds = json.loads(fit.read_text())["seconds"] if fit.is_file() else 0.0
        metrics = evaluate_one(args, checkpoint)
        pictures(args, name, checkpoint)
        if args.fid_features:
            floors = references(args, checkpoint)
        rows.append(
            {
                "name": name,
                "metrics": metrics,
                "sigma": sigma_of(checkpoint),
                "steps": result["steps"],
                "batch": mean_batch(checkpoint),
                "train_seconds": result["wall_seconds"] - fit_seconds,
                "cpu_seconds": None if args.evaluate_only else cpu - fit_seconds,
                "checkpoint": f"{checkpoint.stem} (step {steps_of(checkpoint):,})",
                "fd_reconstructions": floors.get("reconstructions", float("nan")),
            }
        )
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        print(f"{name}: {time.perf_counter() - began:.0f} s in all; load {load}", flush=True)

    elapsed = datetime.datetime.now() - started
    metrics = rows[0]["metrics"]
    lines = [
        *header,
        f"wall time of the whole comparison: {elapsed.total_seconds() / 60:.0f} min",
        f"test metrics on the first {args.eval_images} test images, NLL with "
        f"{args.iw_samples} importance samples"
        + (
            f"; FD of {args.fid_samples} samples to {metrics['fid_real_images']} test images "
            f"in {args.fid_features}'s features (training images: {floors['train']:.2f})"
            if args.fid_features
            else ""
        ),
        "",
        *table(rows, "mae_per_channel" in metrics, bool(args.fid_features)),
    ]
    print("\n" + "\n".join(lines))
    (args.out / f"table-{args.checkpoint}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
