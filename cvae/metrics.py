"""What a trained VAE is worth: likelihood bounds, bits per dimension, reconstruction quality
and how much of the latent space it uses, over a whole split."""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from cvae.errors import Interrupted, stopped_by
from cvae.models import CVAE
from cvae.models.inference import FastDecoder
from cvae.models.losses import kl_per_dimension
from cvae.models.networks import unit_range
from cvae.models.priors import Prior

log = logging.getLogger(__name__)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2016): Var_x E_q[z_d] above this is "active"
PER_IMAGE = ("iw_nll", "neg_elbo", "recon", "kl", "mse_per_pixel", "psnr", "ssim")
CHUNK_IMAGES = 64  # images per resumable chunk (and per call of the encoder)


def is_binary(images: torch.Tensor) -> bool:
    """Whether uint8 images hold only 0 and 255 (or float images only 0 and 1)."""
    top = 255 if images.dtype == torch.uint8 else 1
    return bool(((images == 0) | (images == top)).all())


def likelihood_input(
    images: torch.Tensor, continuous: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """What the likelihood is evaluated on: for a continuous density, 8-bit images
    dequantised, (x + u) / 256 with u ~ U(0, 1), so that it bounds the probability of the
    8-bit values (Theis et al., 2016); for a probability of binary images, the images."""
    if not continuous or images.dtype != torch.uint8:
        return unit_range(images)
    noise = torch.rand(images.shape, generator=generator).to(images.device)
    return (images.float() + noise) / 256


class PosteriorStatistics:
    """Running mean and variance over the data of each latent's posterior mean, and the mean
    KL of each latent: enough for active units without keeping every `mu`. Active units
    depend on the posterior only; the KL per latent is the prior's (`Prior.kl_per_dimension`:
    under a mixture prior, each dimension's KL to the prior's marginal there). `kl_images`
    caps the images the KL is averaged over (None: all): a mixture prior's marginal KL costs
    `components` times a factorised one's (a VampPrior's 500: minutes per 10,000 images)."""

    def __init__(self, kl_images: int | None = None) -> None:
        self.kl_images = kl_images
        self.count = 0
        self.kl_count = 0
        self.sum: torch.Tensor | None = None
        self.sum_squares: torch.Tensor | None = None
        self.kl_sum: torch.Tensor | None = None

    def update(self, mu: torch.Tensor, log_var: torch.Tensor, prior: Prior | None = None) -> None:
        """Add a batch of posteriors; `prior`: the model's (None: N(0, I))."""
        mu, log_var = mu.detach().double(), log_var.detach().double()
        if self.sum is None:
            self.sum, self.sum_squares, self.kl_sum = (torch.zeros_like(mu[0]) for _ in range(3))
        self.count += len(mu)
        self.sum += mu.sum(0)
        self.sum_squares += mu.pow(2).sum(0)
        room = len(mu) if self.kl_images is None else max(self.kl_images - self.kl_count, 0)
        mu, log_var = mu[:room], log_var[:room]
        if len(mu):
            kl = (kl_per_dimension(mu, log_var) if prior is None
                  else prior.kl_per_dimension(mu, log_var))  # fmt: skip
            self.kl_sum += kl.sum(0)
            self.kl_count += len(mu)

    def sum_over_ranks(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Make these the statistics of every rank's data: `reduce` sums a tensor over the
        ranks (data-parallel validation, where each rank sees a share)."""
        counts = torch.tensor([float(self.count), float(self.kl_count)], dtype=torch.float64,
                              device=self.sum.device)  # fmt: skip
        packed = reduce(torch.cat([counts, self.sum, self.sum_squares, self.kl_sum]))
        self.count, self.kl_count = int(packed[0]), int(packed[1])
        self.sum, self.sum_squares, self.kl_sum = packed[2:].split(len(self.sum))

    def state(self) -> dict:
        """Plain tensors to save with a chunk of results (see `merge`)."""
        return {"count": self.count, "kl_count": self.kl_count, "sum": self.sum,
                "sum_squares": self.sum_squares, "kl_sum": self.kl_sum}  # fmt: skip

    def merge(self, state: dict) -> None:
        """Add the statistics of another share of the data (a `state()`; one saved before
        `kl_count` existed averaged the KL over all its images)."""
        if self.sum is None:
            self.sum, self.sum_squares, self.kl_sum = (
                torch.zeros_like(state["sum"]) for _ in range(3)
            )
        self.count += state["count"]
        self.kl_count += state.get("kl_count", state["count"])
        self.sum += state["sum"]
        self.sum_squares += state["sum_squares"]
        self.kl_sum += state["kl_sum"]

    def variance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sum_squares / self.count - mean.pow(2)).clamp_min(0)

    def active_units(self) -> int:
        return int((self.variance() > ACTIVE_UNIT_THRESHOLD).sum())

    def kl_per_dim(self) -> torch.Tensor:
        return self.kl_sum / self.kl_count


def chunk_generator(seed: int, index: int) -> torch.Generator:
    """The random numbers of chunk `index`: a function of `(seed, index)` only, so a chunk
    draws the same dequantisation noise and posterior samples whether or not the chunks
    before it ran in this process (an evaluation resumed after an interruption)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def evaluate_chunk(
    model: CVAE,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    iw_samples: int,
    generator: torch.Generator,
    max_decodes: int = 1024,
    decoder: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict:
    """Per-image results of one chunk of images (uint8 or [0, 1]) with their `labels` (a
    conditional model's classes, else None), the chunk's posterior statistics and whether
    its images are binary: what a chunk file holds. Nothing is read back to the host until
    the chunk is done. `decoder`: see `CVAE.log_likelihood`."""
    images = images.to(model.device)
    with torch.inference_mode():
        clean = unit_range(images)
        x = likelihood_input(images, model.likelihood.continuous, generator)
        log_px, kl, mu, log_var = model.elbo_terms(x, labels, generator=generator)
        nll = -model.log_likelihood(x, labels, k=iw_samples, generator=generator,
                                    max_decodes=max_decodes, decoder=decoder)  # fmt: skip
        mean_decoded = model.reconstruct(clean, labels)
        statistics = PosteriorStatistics()
        statistics.update(mu, log_var, model.prior)
        values = {
            "iw_nll": nll,
            "neg_elbo": kl - log_px,
            "recon": -log_px,
            "kl": kl,
            "mse_per_pixel": (mean_decoded - clean).pow(2).flatten(1).mean(1),
            "psnr": peak_signal_noise_ratio(mean_decoded, clean, data_range=1.0,
                                            reduction="none", dim=(1, 2, 3)),
            "ssim": structural_similarity_index_measure(mean_decoded, clean, data_range=1.0,
                                                        reduction="none"),
        }  # fmt: skip
    return {
        "images": len(images),
        "values": {name: value.double().cpu() for name, value in values.items()},
        "posterior": {
            k: v.cpu() if torch.is_tensor(v) else v for k, v in statistics.state().items()
        },  # fmt: skip
        "binary": is_binary(images),
        "dims": images[0].numel(),
    }


def image_chunks(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]], size: int, max_images: int | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The `(images, labels)` of `batches` regrouped into chunks of `size` (the last may be
    smaller), whatever the loader's batch size: chunk boundaries, so resuming, depend on
    `size` only."""
    pending: list[tuple[torch.Tensor, torch.Tensor]] = []
    held = seen = 0
    for images, labels in batches:
        if max_images is not None:
            images, labels = images[: max_images - seen], labels[: max_images - seen]
        seen += len(images)
        while len(images):
            take = size - held
            pending.append((images[:take], labels[:take]))
            held += len(images[:take])
            images, labels = images[take:], labels[take:]
            if held == size:
                yield torch.cat([i for i, _ in pending]), torch.cat([lb for _, lb in pending])
                pending, held = [], 0
        if max_images is not None and seen >= max_images:
            break
    if pending:
        yield torch.cat([i for i, _ in pending]), torch.cat([lb for _, lb in pending])


def count_images(batches: Iterable, max_images: int | None = None) -> int | None:
    """How many images `batches` holds (a DataLoader, our device batches or a list), if known."""
    total = None
    for source in (getattr(batches, "dataset", None), getattr(batches, "sampler", None)):
        if source is not None and hasattr(source, "__len__"):
            total = len(source)
            break
    if total is None and isinstance(batches, (list, tuple)):
        total = sum(len(batch[0]) for batch in batches)
    if total is not None and max_images is not None:
        total = min(total, max_images)
    return total


class ProgressReport:
    """Images done, with an ETA: a rich progress bar on a terminal (stderr), else a log line
    at most every `every` seconds (batch jobs, pipes). `done` images count as finished
    before this process started (a resumed evaluation): they do not enter the rate."""

    def __init__(self, total: int | None, label: str, done: int = 0, enabled: bool = True,
                 every: float = 30.0) -> None:  # fmt: skip
        self.total, self.label, self.done, self.enabled = total, label, done, enabled
        self.started, self.start_done, self.every = time.monotonic(), done, every
        self.last_line = self.started
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich import progress as bars
            from rich.console import Console

            self.bar = bars.Progress(
                bars.TextColumn(f"{label}: images"), bars.MofNCompleteColumn(),
                bars.BarColumn(), bars.TimeElapsedColumn(), bars.TextColumn("ETA"),
                bars.TimeRemainingColumn(), console=Console(stderr=True), transient=False,
            )  # fmt: skip
            self.bar.start()
            self.task = self.bar.add_task(label, total=total, completed=done)

    def advance(self, images: int) -> None:
        self.done += images
        if self.bar is not None:
            self.bar.update(self.task, advance=images)
            return
        now = time.monotonic()
        if self.enabled and (now - self.last_line >= self.every or self.done == self.total):
            self.last_line = now
            log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        """`<label>: 1,200 of 10,000 images, 2.3 min, about 17.0 min left`."""
        from cvae.progress import duration  # one way to write a time, as training's lines do

        elapsed = now - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        of = f" of {self.total:,}" if self.total else ""
        text = f"{self.label}: {self.done:,}{of} images, {duration(elapsed)}"
        if self.total and rate > 0:
            text += f", about {duration((self.total - self.done) / rate)} left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class ChunkStore:
    """Finished chunks of an evaluation as files `chunks/00000.pt`, ... under `folder`,
    each written whole (to a `.partial` file, then renamed), so an interrupted evaluation
    keeps every finished chunk and the same command continues after it."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) / "chunks" if folder is not None else None
        self.memory: dict[int, dict] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            for partial in self.folder.glob("*.partial"):  # cut off mid-write
                partial.unlink()

    def path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.pt"

    def done(self) -> set[int]:
        if self.folder is None:
            return set(self.memory)
        return {int(p.stem) for p in self.folder.glob("*.pt") if p.stem.isdigit()}

    def save(self, index: int, chunk: dict) -> None:
        if self.folder is None:
            self.memory[index] = chunk
            return
        partial = self.path(index).with_suffix(".partial")
        torch.save(chunk, partial)
        os.replace(partial, self.path(index))

    def load(self, index: int) -> dict:
        if self.folder is None:
            return self.memory[index]
        return torch.load(self.path(index), weights_only=True)


def evaluate_model(
    model: CVAE,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    iw_samples: int = 1000,
    seed: int = 0,
    max_images: int | None = None,
    *,
    folder: str | Path | None = None,
    chunk_images: int = CHUNK_IMAGES,
    max_decodes: int | None = None,
    progress: bool = False,
) -> dict:
    """Per-image means over `batches` (uint8 or [0, 1] images), in nats unless named.

    `neg_elbo` = `recon` + `kl` and `iw_nll` (importance weighted, `iw_samples` samples) are
    negative log-likelihoods with the decoder's proper density, on binary images as they are
    or on dequantised 8-bit images; `bits_per_dim` converts `iw_nll` to bits per pixel value
    of the discrete data. `mse_per_pixel`, `psnr` (dB) and `ssim` compare the images with
    the decoding of their posterior means.

    Images are evaluated in chunks of `chunk_images`, chunk `i` with random numbers from
    `(seed, i)`. With `folder`, each finished chunk is saved there and chunks already there
    are not evaluated again: an interrupted evaluation continues where it stopped, with the
    numbers an uninterrupted one gives (same `chunk_images` and `max_decodes`), and
    `per_image.csv` is written at the end. `max_decodes` latents are decoded per call
    (None: `FastDecoder.decodes_per_call`). `progress` shows images done and time left.
    A conditional model is evaluated with each image's label: its likelihoods are of x given
    its class, log p(x | y) (`conditional` says so).
    """
    if iw_samples < 1:
        raise ValueError(f"eval.iw_samples must be >= 1, got {iw_samples}")
    if chunk_images < 1:
        raise ValueError(f"eval.chunk_images must be >= 1, got {chunk_images}")
    if max_decodes is not None and max_decodes < 1:
        raise ValueError(f"eval.max_decodes must be null or >= 1, got {max_decodes}")
    store = ChunkStore(folder)
    finished = store.done()
    model.eval()
    total = count_images(batches, max_images)
    already = 0
    if total is not None:
        already = sum(min(chunk_images, total - i * chunk_images) for i in finished
                      if i * chunk_images < total)  # fmt: skip
    report = ProgressReport(total, f"IW NLL, K={iw_samples}", already, enabled=progress)
    count = 0
    decoder = FastDecoder(model.decoder)
    max_decodes = max_decodes if max_decodes is not None else decoder.decodes_per_call()
    try:
        grouped = image_chunks(batches, chunk_images, max_images)
        for index, (images, labels) in enumerate(grouped):
            count += len(images)
            if index in finished:
                if store.load(index)["images"] != len(images):
                    raise ValueError(
                        f"{store.path(index)} holds another chunk of images than this "
                        "evaluation's: delete its folder to start afresh"
                    )
                continue
            generator = chunk_generator(seed, index)
            labels = labels.to(model.device) if model.conditional else None
            store.save(index, evaluate_chunk(model, images, labels, iw_samples, generator,
                                             max_decodes, decoder))  # fmt: skip
            report.advance(len(images))
    except KeyboardInterrupt as stop:
        if folder is None:
            raise
        what, status = stopped_by(stop)
        kept = f"{len(store.done())} finished chunks of {chunk_images} images kept in {folder}"
        raise Interrupted(
            f"{what}: {kept}; the same command continues from there", status
        ) from None
    finally:
        report.close()
    if count == 0:
        raise ValueError("no images to evaluate")
    chunks = [store.load(i) for i in range(math.ceil(count / chunk_images))]
    metrics = aggregate_chunks(chunks, model, iw_samples)
    if folder is not None:
        write_per_image(chunks, Path(folder) / "per_image.csv")
    return metrics


def aggregate_chunks(chunks: list[dict], model: CVAE, iw_samples: int) -> dict:
    """The metrics of an evaluation from its chunks, in order: the same whether they were
    computed in one run or across interrupted ones."""
    values = {name: torch.cat([c["values"][name] for c in chunks]) for name in PER_IMAGE}
    count, dims = len(values["iw_nll"]), chunks[0]["dims"]
    binary = all(c["binary"] for c in chunks)
    posterior = PosteriorStatistics()
    for chunk in chunks:
        posterior.merge(chunk["posterior"])
    metrics = {name: float(values[name].mean()) for name in PER_IMAGE if name not in
               ("psnr", "ssim")}  # fmt: skip
    continuous = model.likelihood.continuous
    # A density on [0, 1] bounds the 8-bit data's probability once ln 256 per value is added;
    # a Bernoulli is a probability only of binary data, and means nothing as NLL otherwise.
    offset = dims * math.log(256) if continuous else 0.0
    proper = continuous or binary
    bits = (metrics["iw_nll"] + offset) / (dims * math.log(2))
    if not proper:
        log.warning(
            "a Bernoulli likelihood on non-binary images is not a density: its NLL means "
            "nothing and bits/dim are not reported (evaluate with data.binarize=true)"
        )
    metrics.update(
        bits_per_dim=bits if proper else None,
        images=count,
        iw_samples=iw_samples,
        binary_data=binary,
        proper_density=proper,
        conditional=model.conditional,  # likelihoods of x given its class: log p(x | y)
        psnr=float(values["psnr"].mean()),
        ssim=float(values["ssim"].mean()),
        active_units=posterior.active_units(),
        latent_dim=int(model.hparams.latent_dim),
        kl_per_dim=[round(v, 6) for v in posterior.kl_per_dim().tolist()],
    )
    return metrics


def write_per_image(chunks: list[dict], path: Path) -> None:
    """`per_image.csv`: one row per image, in evaluation order (`index` into the split)."""
    partial = path.with_suffix(".partial")
    with open(partial, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", *PER_IMAGE])
        index = 0
        for chunk in chunks:
            columns = [chunk["values"][name].tolist() for name in PER_IMAGE]
            for row in zip(*columns, strict=True):
                writer.writerow([index, *(f"{v:.6f}" for v in row)])
                index += 1
    os.replace(partial, path)
