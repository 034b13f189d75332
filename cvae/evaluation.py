"""`python -m cvae.evaluate`: a checkpoint's metrics over a whole split, resumable.

The images are cut into chunks (`image_chunks`); each chunk's per-image metrics
(`metrics.image_metrics`) are saved as a file of the evaluation's own folder
(`ChunkStore`), named by everything that changes its numbers (`evaluation_folder`), so the
same command continues an interrupted evaluation with the numbers an uninterrupted one
gives; `metrics.combine` turns the chunks into the metrics, written as `metrics.json` and
`per_image.csv` and printed as a table.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import rich
import rich.table
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cvae.data import ImageDataModule
from cvae.errors import Interrupted, stopped_by
from cvae.files import atomic_write, sha256, why_unreadable
from cvae.loading import fitted_sampler, load_checkpoint, load_model
from cvae.metrics import PER_IMAGE, combine, image_metrics
from cvae.models import CVAE
from cvae.progress import ProgressReport, count_images
from cvae.samplers import LatentSampler, sampler_path

log = logging.getLogger(__name__)
CHUNK_IMAGES = 64  # images per resumable chunk (and per call of the encoder)
# The `eval.*` keys that change FID and KID (with the sampler and the feature network file).
FID_KEYS = ("fid_samples", "fid_batch_size", "fid_features", "fid_weights", "seed")


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Metrics of a checkpoint on a split, printed as a table and saved as metrics.json in
    the evaluation's own folder (see `evaluation_folder`), which also keeps every finished
    chunk of images: the same command continues an interrupted evaluation."""
    ev = cfg.eval
    model, datamodule, split = evaluation_data(cfg)
    extractor = sampler = None
    if ev.get("fid"):  # the feature network and sampler first: a bad one stops before any work
        if int(ev.fid_samples) < 2:
            raise ValueError(f"eval.fid_samples must be >= 2, got {ev.fid_samples}")
        from cvae.fid import feature_extractor

        sampler = fitted_sampler(cfg, model, datamodule)
        hp = model.hparams  # a feature network file is probed at the data's channels and size
        extractor = feature_extractor(
            ev.get("fid_features"), ev.get("fid_weights"), hp.in_channels, hp.image_size
        )
    loader = with_model_labels(datamodule.ordered_dataloader(split), model, datamodule)
    options = {
        "iw_samples": int(ev.iw_samples),
        "seed": int(ev.seed),
        "max_images": ev.max_images,
        "chunk_images": int(ev.get("chunk_images", 64)),
        "max_decodes": ev.get("max_decodes"),
    }
    folder = evaluation_folder(cfg, model, datamodule, split, options, sampler)
    log.info(
        "evaluating %s, %s split, K=%d: results in %s",
        cfg.ckpt_path,
        split,
        options["iw_samples"],
        folder,
    )
    metrics = evaluate_model(
        model, loader, **options, folder=folder, progress=bool(ev.get("progress", True))
    )
    if extractor is not None:
        from cvae.fid import sample_quality

        metrics.update(
            sample_quality(
                model,
                loader,
                samples=int(ev.fid_samples),
                seed=int(ev.seed),
                extractor=extractor,
                batch_size=int(ev.get("fid_batch_size", 64)),
                progress=bool(ev.get("progress", True)),
                sampler=sampler,
            )
        )
        metrics["fid_sampler"] = sampler.name
        if ev.get("fid_features"):  # these FIDs compare only with FIDs of the same file
            metrics["fid_features"] = str(extractor.path)
    metrics = {"ckpt_path": str(cfg.ckpt_path), "split": split, **metrics}
    settings = {"model": dict(model.hparams), "data": dict(datamodule.hparams)}
    with atomic_write(folder / "metrics.json", "w") as handle:
        handle.write(json.dumps({**metrics, **settings}, indent=2))
    print_metrics(metrics)
    log.info("metrics written to %s", folder / "metrics.json")
    return metrics


# Data settings that change how images are read, not which images or pixels: left out of
# an evaluation's identity.
LOADER_ONLY = (
    "batch_size",
    "num_workers",
    "pin_memory",
    "persistent_workers",
    "prefetch_factor",
    "cache",
    "cache_dir",
    "cache_workers",
    "on_device",
    "download",
    "strict",
)


def evaluation_folder(
    cfg: DictConfig,
    model: CVAE,
    datamodule: ImageDataModule,
    split: str,
    options: dict,
    sampler: LatentSampler | None = None,
) -> Path:
    """`<paths.output_dir>/<checkpoint stem>-<split>-k<K>-<hash>/`: one folder per checkpoint
    file (by content), split, evaluation options, device type, data settings and, with
    `eval.fid`, the sampler (its settings and fit file, by content) and FID settings: so the
    same command finds the chunks an interrupted run left, and any evaluation whose numbers
    could differ gets a folder of its own. Holds `settings.json` (what the hash covers) and
    `config.yaml`."""
    path = Path(str(cfg.ckpt_path))
    data = {k: v for k, v in dict(datamodule.hparams).items() if k not in LOADER_ONLY}
    identity = {
        "checkpoint_sha256": sha256(path),
        "split": split,
        **options,
        "device": model.device.type,
        "data": data,
    }
    if sampler is not None:
        fit = sampler_path(path, sampler.name)
        ev = cfg.eval
        identity["sampler"] = {
            "name": sampler.name,
            "settings": sampler.settings(),
            "fit_sha256": sha256(fit) if sampler.needs_fit else None,
        }
        identity["fid"] = {key: ev.get(key) for key in FID_KEYS}
        if ev.get("fid_features"):
            identity["fid"]["features_sha256"] = sha256(Path(ev.fid_features).expanduser())
    text = json.dumps(identity, indent=2, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:10]
    folder = Path(cfg.paths.output_dir) / f"{path.stem}-{split}-k{options['iw_samples']}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(text + "\n")
    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    return folder


def evaluation_data(cfg: DictConfig) -> tuple[CVAE, ImageDataModule, str]:
    """The model, its data and the split to evaluate. A `data=folder` folder is read at the
    checkpoint's channels and size (any image converts) and evaluated whole unless
    `eval.split` names a split; other data is evaluated on its test split by default."""
    split = cfg.eval.get("split")
    if split is not None and split not in ("train", "val", "test"):
        raise ValueError(f"eval.split={split!r} is not one of train, val, test (or null)")
    if cfg.get("data") and cfg.data.get("source") == "folder":
        model = load_model(cfg)
        hp = model.hparams
        datamodule = instantiate(cfg.data, channels=hp.in_channels, image_size=hp.image_size)
        log.info(
            "data.root=%s: images read as %d channel(s), %dx%d, as the checkpoint's model",
            cfg.data.root,
            hp.in_channels,
            hp.image_size,
            hp.image_size,
        )
        split = split or "all"
    else:
        model, datamodule = load_checkpoint(cfg)
        split = split or "test"
    if cfg.eval.batch_size:
        datamodule.hparams.batch_size = int(cfg.eval.batch_size)
    if split == "train" and datamodule.hparams.binarize:
        raise ValueError(
            "eval.split=train with data.binarize=true: training images are binarised afresh "
            "at every training step, so there is no fixed train set; evaluate val or test"
        )
    return model, datamodule, split


class _Relabelled:
    """Batches of `loader` with each label turned from the data's class index into the
    model's (`table[label]`); `dataset` stays visible, so the image count is known."""

    def __init__(self, loader, table: torch.Tensor) -> None:
        self.loader, self.table, self.dataset = loader, table, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            yield images, self.table.to(labels.device)[labels]


def with_model_labels(loader, model: CVAE, datamodule: ImageDataModule):
    """A conditional model is scored with each image's class as the model names it: the
    data's classes (a folder's subfolders sort in their own order, and may be a subset) are
    matched to the checkpoint's `class_names` by name, and an unknown class is a one-line
    error here, before any work."""
    if not model.conditional:
        return loader
    names = datamodule.labelled_classes()  # a one-line error for images without a class
    where = f"data.root={datamodule.hparams.root}" if datamodule.hparams.get("root") else "the data"
    table = model.classes.translation(names, where)
    if torch.equal(table, torch.arange(len(model.class_names))):
        return loader  # the model's own classes, in its order
    log.info(
        "classes of %s matched to the checkpoint's by name: %s",
        where,
        ", ".join(f"{n} -> {int(i)}" for n, i in zip(names, table, strict=True)),
    )
    return _Relabelled(loader, table)


def print_metrics(metrics: dict) -> None:
    caption = (
        "conditional model: neg_elbo, iw_nll and bits_per_dim are of x given its class, "
        "-log p(x | y)"
        if metrics.get("conditional")
        else None
    )
    table = rich.table.Table("metric", "value", title=f"{metrics['split']} split", caption=caption)
    for key, value in metrics.items():
        if key == "kl_per_dim":
            top = sorted(value, reverse=True)[:5]
            value = "largest: " + ", ".join(f"{v:.2f}" for v in top)
        elif isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, dict):  # per channel
            value = ", ".join(f"{name} {v:.4f}" for name, v in value.items())
        table.add_row(key, str(value))
    rich.print(table)


def chunk_generator(seed: int, index: int) -> torch.Generator:
    """The random numbers of chunk `index`: a function of `(seed, index)` only, so a chunk
    draws the same dequantisation noise and posterior samples whether or not the chunks
    before it ran in this process (an evaluation resumed after an interruption)."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


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


class ChunkStore:
    """Finished chunks of an evaluation as files `chunks/00000.pt`, ... under `folder`,
    each written whole (`files.atomic_write`), so an interrupted evaluation keeps every
    finished chunk and the same command continues after it."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) / "chunks" if folder is not None else None
        self.memory: dict[int, dict] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

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
        with atomic_write(self.path(index)) as handle:
            torch.save(chunk, handle)

    def load(self, index: int) -> dict:
        if self.folder is None:
            return self.memory[index]
        return torch.load(self.path(index), weights_only=True)

    def intact(self, index: int) -> dict | None:
        """Finished chunk `index`, or None when its file cannot be read as one (truncated,
        emptied, replaced): that file is removed and said in one log line, so the chunk is
        evaluated again rather than the whole evaluation failing on it."""
        try:
            chunk = self.load(index)
        except Exception as error:
            reason = why_unreadable(self.path(index), error)
        else:
            if isinstance(chunk, dict) and {"images", "values"} <= chunk.keys():
                return chunk
            reason = "not an evaluation chunk"
        log.warning("%s is damaged (%s): evaluating that chunk again", self.path(index), reason)
        self.path(index).unlink(missing_ok=True)
        return None


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
    (None: `FastDecoder.decodes_per_call`, or `log_likelihood`'s default). `progress` shows
    images done and time left.
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
    finished = {i for i in store.done() if store.intact(i) is not None}  # damaged: again
    model.eval()
    total = count_images(batches, max_images)
    already = 0
    if total is not None:
        already = sum(
            min(chunk_images, total - i * chunk_images)
            for i in finished
            if i * chunk_images < total
        )
    report = ProgressReport(total, f"IW NLL, K={iw_samples}", already, enabled=progress)
    count = 0
    decoder = model.fast_logits()  # None: the model's own walk (latent maps)
    if max_decodes is None and decoder is not None:
        max_decodes = decoder.decodes_per_call()
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
            labels = model.given(labels.to(model.device))
            store.save(
                index,
                image_metrics(model, images, labels, iw_samples, generator, max_decodes, decoder),
            )
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
    metrics = combine(chunks, model, iw_samples)
    if folder is not None:
        write_per_image(chunks, Path(folder) / "per_image.csv")
    return metrics


def write_per_image(chunks: list[dict], path: Path) -> None:
    """`per_image.csv`: one row per image, in evaluation order (`index` into the split)."""
    with atomic_write(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow(["index", *PER_IMAGE])
        index = 0
        for chunk in chunks:
            columns = [chunk["values"][name].tolist() for name in PER_IMAGE]
            for row in zip(*columns, strict=True):
                writer.writerow([index, *(f"{v:.6f}" for v in row)])
                index += 1
