"""Sample quality per model x likelihood x prior x sampler (x decoder up-sampling), one
training budget.

    python benchmarks/sample_quality.py --features outputs/features/fashion_mnist/features.pt \
        [--steps 2400 | --minutes 10] [--models cvae hvae hvae_maps] \
        [--likelihoods gaussian_fixed gaussian_optimal] [--priors standard mog vamp] \
        [--samplers prior gmm two_stage] [--upsample resize transpose] [--samples 5000] \
        [--temperatures 1.0 1.1 1/0.5] [hydra overrides for every cell ...]

Trains each `--models` preset (`model=<name>`; default: `cvae`, the default model) on
Fashion-MNIST at 64x64 once per (model, likelihood, prior, up-sampling) cell for `--steps`
steps of batch 64 (same seed, so the same data order), or for `--minutes` of training each
(equal time: a model whose step costs more takes fewer steps; the steps reached are
printed), fits each ex-post sampler to its training posteriors (with the settings of
`conf/sampler/<name>.yaml`, as `cvae.generate mode=fit` does; a hierarchy's top level), and
measures the Frechet distance (FD) between `--samples` samples and as many test images in
the features of a Fashion-MNIST classifier (`cvae.train_features`; comparable only with FDs
of the same feature file). Hydra overrides after the options apply to every cell
(`experiment=quickstart`: the quick start's 32x32 images, with a 32x32 feature file). Two
floors are measured in the same run: real training images against the test images, and
reconstructions of the test images. Prints the training budget, the time of each cell and
a Markdown table with each FD as a ratio to the cell's reconstructions and to its own
`prior` sampler, and the samples' variety as the feature file's classifier sees it (classes
among the first 64, the rarest class's share of all; a classifier names a class even for a
blob: look at the grids); saves a 64-image grid per cell under `--out`. With several
`--temperatures`, each sampler draws at each one (every level of a hierarchy at it, or
`TOP/BELOW`: the top level at TOP, the levels below at BELOW) and
keeps the one whose samples lie nearest to as many validation images (held out of training
and of the fit); its FD to the test images is reported, beside the FD at temperature 1 (the
fitted density itself) where 1 is among them. A cell whose
`<out>/<cell>/checkpoints/last.ckpt` has its budget is not trained again (its train time
then reads 0); one with less (a run cut short) resumes from it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from common import compose_train, machine

REPO = Path(__file__).resolve().parents[1]


def _batches(images: torch.Tensor, size: int = 256) -> Iterator[torch.Tensor]:
    yield from images.split(size)


def _first_images(loader, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, seen = [], [], 0
    for batch, batch_labels in loader:
        images.append(batch[: count - seen])
        labels.append(batch_labels[: count - seen])
        seen += len(images[-1])
        if seen >= count:
            break
    return torch.cat(images), torch.cat(labels)


def _variety(features, samples: torch.Tensor, classes: int) -> tuple[int, float]:
    """How many classes the feature network's classifier sees among the first 64 samples,
    and the share of the rarest class among all of them."""
    with torch.inference_mode():
        seen = torch.cat([features.network.classify(b).argmax(1) for b in _batches(samples)])
    return len(seen[:64].unique()), float(torch.bincount(seen, minlength=classes).min()) / len(seen)


def _per_level(temperature: str, levels: int) -> float | list[float]:
    """A `--temperatures` entry for a model of `levels` latent levels: one number for every
    level, or `TOP/BELOW`, the top level at TOP and each level below at BELOW."""
    top, _, below = temperature.partition("/")
    if not below:
        return float(top)
    return [float(top)] + [float(below)] * (levels - 1)


def _trained(checkpoint: Path) -> tuple[int, float]:
    """Training steps and seconds in a cell's last.ckpt (Lightning's `Timer` keeps them
    under `trainer.max_time`; 0, 0: none yet)."""
    if not checkpoint.is_file():
        return 0, 0.0
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    timer = next((v for k, v in saved.get("callbacks", {}).items() if "Timer" in k), {})
    return saved["global_step"], float(timer.get("time_elapsed", {}).get("train", 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--features",
        type=Path,
        required=True,
        help="a feature network file written by cvae.train_features",
    )
    parser.add_argument("--steps", type=int, default=2400, help="training steps per cell")
    parser.add_argument(
        "--minutes", type=float, help="minutes of training per cell instead of --steps"
    )
    parser.add_argument(
        "--models", nargs="+", default=["cvae"], help="model presets (conf/model/<name>.yaml)"
    )
    parser.add_argument("--likelihoods", nargs="+", default=["gaussian_fixed", "gaussian_optimal"])
    parser.add_argument("--priors", nargs="+", default=["standard", "mog", "vamp"])
    parser.add_argument("--samplers", nargs="+", default=["prior", "gmm", "two_stage"])
    parser.add_argument(
        "--upsample",
        nargs="+",
        default=["resize"],
        help="model.upsample values (resize: the default model's)",
    )
    parser.add_argument("--samples", type=int, default=5000, help="samples and test images")
    parser.add_argument(
        "--temperatures",
        nargs="+",
        default=["1"],
        help="sampling temperatures to try, each one number for every level or TOP/BELOW (a "
        "hierarchy's top level at TOP, the levels below at BELOW); each sampler's is picked "
        "on validation images",
    )
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "sample_quality")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every cell")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from cvae import ImageDataModule, visualize_batch
    from cvae.errors import Interrupted
    from cvae.fid import feature_network, fid_kid
    from cvae.loading import sampler as configured_sampler
    from cvae.models import from_checkpoint
    from cvae.quiet import quiet_known_noise
    from cvae.samplers import posteriors
    from cvae.training import train

    quiet_known_noise()  # the warnings the commands silence
    features = feature_network(args.features)
    print(f"machine: {machine()}")
    budget = f"{args.minutes:g} minutes" if args.minutes else f"{args.steps} steps"
    print(
        f"budget: {budget} of training, batch 64, per cell; FD of {args.samples} samples "
        f"against as many test images in the features of {args.features}"
    )
    if args.minutes:  # DD:HH:MM:SS, to the second
        seconds = round(args.minutes * 60)
        limit = [f"trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}"]
        limit += ["trainer.max_steps=-1"]
        done = lambda steps, seconds: seconds >= args.minutes * 60  # noqa: E731
    else:
        limit = [f"trainer.max_steps={args.steps}"]
        done = lambda steps, seconds: steps >= args.steps  # noqa: E731

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        samplers = {
            name: configured_sampler(compose("generate", [f"sampler={name}"]))
            for name in args.samplers
        }  # as cvae.generate mode=fit builds them
    wanted = [s.max_images for s in samplers.values() if s.needs_fit]
    fit_images = None if None in wanted or not wanted else max(wanted)
    for sampler in samplers.values():
        print(sampler.describe())

    def distance(fake: torch.Tensor, real: torch.Tensor) -> float:
        return fid_kid(_batches(real), _batches(fake), features)["fid"]

    rows, floors = [], {}
    cells = [
        (model_name, upsample, likelihood, prior)
        for model_name in args.models
        for upsample in args.upsample
        for likelihood in args.likelihoods
        for prior in args.priors
    ]
    for model_name, upsample, likelihood, prior in cells:
        cell = f"{model_name}-{likelihood}-{prior}-{upsample}"
        run_dir = args.out / cell
        overrides = [
            *args.overrides,
            f"model={model_name}",
            f"model.recon_loss={likelihood}",
            f"model/prior={prior}",
            f"model.upsample={upsample}",
            "test=false",
            *limit,
            "trainer.max_epochs=-1",
            "trainer.limit_val_batches=10",
            "~callbacks.rich_progress_bar",
            "+trainer.enable_progress_bar=false",
        ]
        if not args.minutes:  # one validation, at the end
            overrides += [
                f"+trainer.val_check_interval={args.steps}",
                "trainer.check_val_every_n_epoch=null",
            ]
        checkpoint = run_dir / "checkpoints" / "last.ckpt"
        started = time.perf_counter()
        if not done(*_trained(checkpoint)):  # a cell cut short resumes from its last.ckpt
            try:
                train(compose_train(run_dir, overrides))
            except Interrupted as stop:  # one line, as the commands print
                print(
                    f"{cell} interrupted: saved {stop.checkpoint}; the same "
                    "benchmark command resumes it",
                    file=sys.stderr,
                )
                raise SystemExit(stop.exit_status) from None
        trained = time.perf_counter() - started
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model = from_checkpoint(saved)
        steps, seconds = _trained(checkpoint)
        if not done(steps, seconds):
            raise SystemExit(f"{checkpoint} holds {steps} steps ({seconds:.0f} s): short")
        print(
            f"{cell}: {steps} steps in {seconds:.0f} s of training, trained in this "
            f"run: {trained:.0f} s",
            flush=True,
        )
        datamodule = ImageDataModule.load_from_checkpoint(checkpoint)
        datamodule.setup("fit")
        datamodule.setup("test")
        test, test_labels = _first_images(datamodule.test_dataloader(), args.samples)
        classes = int(test_labels.max()) + 1
        validation, _ = _first_images(datamodule.val_dataloader(), args.samples)
        if not floors:  # the same shuffled training images in every run of the benchmark
            fresh = ImageDataModule(**datamodule.hparams)  # not the cell's saved order
            fresh.setup("fit")
            torch.manual_seed(0)
            train_images, _ = _first_images(fresh.train_dataloader(), args.samples)
            floors["real training images"] = distance(train_images, test)
        reconstructions = torch.cat([model.reconstruct(b) for b in _batches(test)])
        recon_fd = distance(reconstructions, test)
        if any(sampler.needs_fit for sampler in samplers.values()):
            every = datamodule.ordered_dataloader("train")  # as mode=fit reads them
            posterior, _ = posteriors(model, every, fit_images)
            mu, log_var = posterior.mu, posterior.log_var
        prior_fd = None
        for name in args.samplers:
            started = time.perf_counter()
            sampler = samplers[name]  # each cell's fit replaces the last one's
            if sampler.needs_fit:
                first = slice(sampler.max_images)  # the first max_images, as mode=fit
                sampler.fit(mu[first], log_var[first])
            fitted = time.perf_counter() - started
            picked = None  # (validation FD, temperature, samples): the best so far
            at_one = None  # the samples at temperature 1, the fitted density itself
            for temperature in args.temperatures:
                generator = torch.Generator().manual_seed(0)
                samples = torch.cat(
                    [
                        model.sample(
                            min(256, args.samples - start),
                            _per_level(temperature, model.latent_levels),
                            generator,
                            sampler=sampler,
                        )
                        for start in range(0, args.samples, 256)
                    ]
                )
                val_fd = distance(samples, validation)
                print(
                    f"{cell} {name} temperature {temperature}: FD {val_fd:.1f} "
                    "against validation images",
                    flush=True,
                )
                if picked is None or val_fd < picked[0]:
                    picked = (val_fd, temperature, samples)
                at_one = samples if _per_level(temperature, 1) == 1.0 else at_one
            val_fd, temperature, samples = picked
            fd = distance(samples, test)
            if at_one is samples or at_one is None:  # the pick itself, or not drawn
                fd_at_one = fd if at_one is samples else None
            else:
                fd_at_one = distance(at_one, test)
            prior_fd = fd if name == "prior" else prior_fd
            visualize_batch(samples[:64], args.out / f"{cell}-{name}.png", nrow=8)
            in_64, rarest = _variety(features, samples, classes)
            rows.append(
                dict(
                    model=model_name,
                    steps=steps,
                    likelihood=likelihood,
                    prior=prior,
                    upsample=upsample,
                    sampler=name,
                    at_one=fd_at_one,
                    temperature=temperature,
                    fd=fd,
                    recon_fd=recon_fd,
                    prior_fd=prior_fd,
                    in_64=in_64,
                    rarest=rarest,
                    trained=trained,
                    fitted=fitted,
                )
            )
            print(
                f"{cell} {name}: FD {fd:.1f} at temperature {temperature} "
                f"(reconstructions {recon_fd:.1f}); {in_64} classes in the first 64, "
                f"the rarest {rarest:.1%} of all; trained {trained:.0f} s, "
                f"fitted {fitted:.0f} s",
                flush=True,
            )

    print("\nfloors: " + ", ".join(f"{k} FD {v:.2f}" for k, v in floors.items()))
    columns = [
        "model",
        "steps",
        "likelihood",
        "prior",
        "up-sampling",
        "sampler",
        "FD at temperature 1",
        "picked temperature",
        "FD there",
        "/ reconstructions'",
        "/ its prior sampler's",
        "classes in 64",
        "rarest class",
        "train",
        "fit",
    ]
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        versus_prior = f"{row['fd'] / row['prior_fd']:.2f}x" if row["prior_fd"] else "-"
        one = f"{row['at_one']:.1f}" if row["at_one"] is not None else "-"
        print(
            f"| `{row['model']}` | {row['steps']:,} | `{row['likelihood']}` | "
            f"`{row['prior']}` | `{row['upsample']}` | "
            f"`{row['sampler']}` | {one} | {row['temperature']} | {row['fd']:.1f} | "
            f"{row['fd'] / row['recon_fd']:.2f}x | {versus_prior} | {row['in_64']} | "
            f"{row['rarest']:.1%} | {row['trained']:.0f} s | "
            f"{row['fitted']:.0f} s |"
        )


if __name__ == "__main__":
    main()
