"""What `python -m cvae.generate ckpt_path=PATH mode=...` does, usable from Python too.

`sample` draws from the prior (or a fitted ex-post `sampler`; `fit` fits one beside the
checkpoint), `reconstruct` shows every image of a folder (`input`; without one, `n` test
images) beside its reconstruction,
`interpolate` walks between two images (grid and GIF), `traverse` sweeps the directions
along which the posteriors vary most (or single latents). Output: outputs/generate/<timestamp>/.
A conditional model draws the class `label` (a name or an index; `all`: a row per class), and
`interpolate` with `label=[a,b]` walks from one class to the other at a fixed latent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from cvae.data import ImageDataModule, index_folder
from cvae.data.decode import ImageDecodeError, Preprocess
from cvae.loading import fitted_sampler, load_checkpoint
from cvae.metrics import PosteriorStatistics
from cvae.models import CVAE
from cvae.models.classes import folder_name
from cvae.models.user_api import check_level, level_temperatures
from cvae.pixels import unit_range
from cvae.samplers import LatentSampler, posteriors, principal_axes, sampler_path
from cvae.viz import interleave_rows, save_gif, save_images, visualize_batch, visualize_rows

log = logging.getLogger(__name__)
MODES = ("sample", "reconstruct", "interpolate", "traverse", "showcase", "fit")


def load_folder(
    folder: str | Path, preprocess: Preprocess
) -> tuple[torch.Tensor, list[Path], list[str | None]]:
    """Every decodable image under `folder` as a uint8 batch, decoded as training data is,
    with its path and its class subfolder's name (None for files at the top)."""
    index = index_folder(folder, key="input")
    images, names, classes = [], [], []
    for path, label in zip(index.files, index.labels, strict=True):
        try:
            images.append(torch.from_numpy(preprocess.load(path)))
            names.append(path)
            classes.append(index.classes[label] if label >= 0 else None)
        except ImageDecodeError as error:
            log.warning("skipped: %s", error)
    if not images:
        raise ValueError(f"input={folder} holds no decodable image")
    return torch.stack(images), names, classes


def plain(value: object) -> object:
    """A config value as plain Python (lists from the command line are ListConfigs)."""
    return OmegaConf.to_object(value) if isinstance(value, ListConfig) else value


def folder_labels(model: CVAE, label: object, classes: list[str | None]) -> torch.Tensor | None:
    """The labels of a folder's images for a conditional model: `label` for all of them, or
    each image's class subfolder, named like one of the model's classes."""
    if label is not None or not model.conditional:
        return model.class_indices(label, len(classes), key="label")
    if None in classes:
        raise ValueError(
            "label is needed: the model is conditional and input has images outside class "
            f"subfolders; give label=<class> ({', '.join(model.class_names)}) or put the "
            "images in subfolders named after the classes"
        )
    return model.class_indices(classes, key="label")


def pick_images(
    inputs: str | list[str] | None,
    count: int,
    datamodule: ImageDataModule,
    generator: torch.Generator,
    model: CVAE,
    label: object = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`count` images and, for a conditional model, their labels: the given files, of class
    `label` (one, or one per file), or random ones from the test split with their own."""
    preprocess = datamodule.preprocess
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs:
        if len(inputs) != count:
            raise ValueError(f"input needs {count} image file(s), got {len(inputs)}")
        images = torch.stack([torch.from_numpy(preprocess.load(path)) for path in inputs])
        return images, model.class_indices(label, count, key="label")
    datamodule.setup("test")
    test_set = datamodule.test_set
    chosen = torch.randperm(len(test_set), generator=generator)[:count]
    images, labels = zip(*(test_set[int(i)] for i in chosen), strict=True)
    return torch.stack(images), model.given(torch.tensor(labels))


class Directions(NamedTuple):
    """What a traversal sweeps: unit `vectors` `(rows, latent_dim)`, each from -range to
    +range `spreads` `(rows,)` around the `centre` `(latent_dim,)`'s coordinate along it, and
    a line per row saying what it is (`traversal.txt`)."""

    vectors: torch.Tensor
    centre: torch.Tensor
    spreads: torch.Tensor
    names: list[str]


Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


def along_latents(
    model: CVAE, batches: Batches, count: int, level: int = 0, max_images: int = 1024
) -> Directions:
    """The `count` latents of `level` with the most KL over (up to `max_images` of)
    `batches` (images, labels): at the top, each in its prior standard deviations around the
    prior's mean; below it (whose prior depends on the levels above), in the spread of the
    posterior means around their average. What one latent alone encodes."""
    posterior, _ = posteriors(model, batches, max_images)
    statistics = PosteriorStatistics()
    statistics.update(posterior.map(lambda t: t.to(model.device)), model.kl_per_dimension)
    kl = statistics.kl_per_dim()[posterior.span(level)].cpu()
    dims = kl.argsort(descending=True)[:count]
    if level == 0:
        centre, spread = model.prior.marginal_moments()
    else:
        means = posterior.levels[level].mu
        centre, spread = means.mean(0), means.std(0)
    names = [f"latent {d} of level {level} (KL {kl[d]:.2f} nats)" for d in dims.tolist()]
    return Directions(torch.eye(len(kl))[dims], centre, spread[dims], names)


def along_principal_axes(
    model: CVAE, batches: Batches, count: int, level: int = 0, max_images: int = 1024
) -> Directions:
    """The top `count` principal directions of the posterior means of `level` of (up to
    `max_images` of) `batches` (images, labels), each in the means' standard deviation
    along it around their average: the factors the model varies most, even where it spreads
    each over hundreds of latents."""
    mu = posteriors(model, batches, max_images)[0].levels[level].mu
    centre, singular, vectors = principal_axes(mu)
    share = singular.square() / singular.square().sum()
    spreads = singular / max(len(mu) - 1, 1) ** 0.5
    names = [
        f"principal direction {i + 1} ({100 * share[i]:.1f}% of the posterior means' "
        f"variance, sd {spreads[i]:.3g})"
        for i in range(min(count, len(share)))
    ]
    return Directions(vectors[:count], centre, spreads[:count], names)


DIRECTIONS = {"principal": along_principal_axes, "latents": along_latents}


def traverse(
    model: CVAE,
    image: torch.Tensor,
    directions: Directions,
    steps: int,
    span: float,
    label: torch.Tensor | None = None,
    level: int = 0,
) -> torch.Tensor:
    """Rows of images: for each of `directions` (vectors of `level`'s latents), the image's
    posterior means with that level's coordinate along the vector set to `steps` values
    from -span to span spreads around the centre's (a latent's unit vector: that latent
    alone), the other levels held at the image's means; a conditional model all of the
    image's `label`."""
    check_level(level, model.latent_levels)
    vectors, centre, spreads = (
        t.to(model.device) for t in (directions.vectors, directions.centre, directions.spreads)
    )
    values = torch.linspace(-span, span, steps, device=model.device)
    with torch.no_grad():
        posterior = model.encode(image[None].to(model.device), label)
        part = posterior.span(level)
        mu = posterior.means[:, part]
        along = (centre - mu) @ vectors.T  # (1, rows): from the image's mean to the centre
        shift = along.T + spreads[:, None] * values  # (rows, steps)
        latents = posterior.means.repeat(len(vectors) * steps, 1)
        latents[:, part] = mu + (shift[..., None] * vectors[:, None, :]).reshape(-1, mu.shape[1])
        return model.decode_latents(latents, label)


def generate(cfg: DictConfig) -> Path:
    """Run `cfg.mode` with the checkpoint `cfg.ckpt_path`; images go to the output folder."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.mode in ("traverse", "showcase") and cfg.directions not in DIRECTIONS:
        raise ValueError(f"directions={cfg.directions!r} is not one of {', '.join(DIRECTIONS)}")
    model, datamodule = load_checkpoint(cfg)
    if cfg.mode == "fit":
        return _fit(cfg, model, datamodule)
    sampler = fitted_sampler(cfg, model, datamodule)  # before any image: fitted if it is not
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    modes = SHOWCASE if cfg.mode == "showcase" else (cfg.mode,)
    for mode in modes:  # each from the same seed: a mode's images do not depend on the others
        generator = torch.Generator().manual_seed(int(cfg.seed))
        RENDER[mode](model, datamodule, cfg, generator, out, sampler)
    log.info("%s: images written to %s", cfg.mode, out)
    return out


def _fit(cfg: DictConfig, model: CVAE, datamodule: ImageDataModule) -> Path:
    """`mode=fit`: the sampler fitted to the training images and saved beside the
    checkpoint (again, if one is there)."""
    fitted = fitted_sampler(cfg, model, datamodule, refit=True)
    return sampler_path(cfg.ckpt_path, fitted.name)


def _sample(
    model: CVAE,
    datamodule: ImageDataModule,
    cfg: DictConfig,
    generator: torch.Generator,
    out: Path,
    sampler: LatentSampler,
) -> None:
    label, temperature = plain(cfg.get("label")), _temperature(cfg)
    if model.conditional and label in (None, "all"):
        sample_every_class(model, int(cfg.nrow), temperature, generator, out, sampler)
        return
    labels = model.class_indices(label, int(cfg.n), key="label")
    images = model.sample(int(cfg.n), temperature, generator, labels=labels, sampler=sampler)
    visualize_batch(images, out / "samples.png", nrow=cfg.nrow)
    save_images(images, out / "samples")


def _temperature(cfg: DictConfig) -> float | list[float]:
    """`temperature`: one number for every latent level, or a hierarchy's list, one per level."""
    temperature = plain(cfg.temperature)
    if isinstance(temperature, list):
        return [float(t) for t in temperature]
    return float(temperature)


def _reconstruct(
    model: CVAE,
    datamodule: ImageDataModule,
    cfg: DictConfig,
    generator: torch.Generator,
    out: Path,
    sampler: object = None,
) -> None:
    """A folder's images beside their reconstructions; without `input`, `n` random test
    images (as the showcase's)."""
    label = plain(cfg.get("label"))
    if cfg.input:
        inputs, paths, classes = load_folder(cfg.input, datamodule.preprocess)
        labels = folder_labels(model, label, classes)
    else:
        inputs, labels = pick_images(None, int(cfg.n), datamodule, generator, model, label)
        paths = None
    outputs = torch.cat(
        [
            model.reconstruct(inputs[i : i + 256], None if labels is None else labels[i : i + 256])
            for i in range(0, len(inputs), 256)
        ]
    ).cpu()
    columns = min(cfg.nrow, len(inputs))
    visualize_batch(
        interleave_rows(inputs, outputs, columns), out / "reconstructions.png", nrow=columns
    )
    if paths is not None:
        side_by_side = torch.cat([unit_range(inputs), outputs], dim=-1)
        root = Path(cfg.input).expanduser()  # the files were found under it as given
        save_images(side_by_side, out / "pairs", [p.relative_to(root) for p in paths])


def _interpolate(
    model: CVAE,
    datamodule: ImageDataModule,
    cfg: DictConfig,
    generator: torch.Generator,
    out: Path,
    sampler: object = None,
) -> None:
    label = plain(cfg.get("label"))
    if model.conditional and label is not None and not cfg.input:  # a walk between classes
        first, second = _class_pair(label)
        top = level_temperatures(_temperature(cfg), model.latent_levels)[0]
        z = model.sample_latents(1, top, generator)
        frames = model.interpolate_classes(first, second, z, int(cfg.steps))
    else:
        (first, second), labels = pick_images(cfg.input, 2, datamodule, generator, model, label)
        frames = model.interpolate(
            first,
            second,
            int(cfg.steps),
            bool(cfg.spherical),
            labels,
            level=int(cfg.get("level", 0)),
        )
    visualize_batch(frames, out / "interpolation.png", nrow=len(frames))
    save_gif(frames, out / "interpolation.gif")


def _traverse(
    model: CVAE,
    datamodule: ImageDataModule,
    cfg: DictConfig,
    generator: torch.Generator,
    out: Path,
    sampler: object = None,
) -> None:
    label = plain(cfg.get("label"))
    (image,), labels = pick_images(cfg.input, 1, datamodule, generator, model, label)
    level = int(cfg.get("level", 0))
    check_level(level, model.latent_levels)
    datamodule.setup("test")
    batches = datamodule.test_dataloader()
    directions = DIRECTIONS[cfg.directions](model, batches, int(cfg.dims), level)
    grid = traverse(model, image, directions, int(cfg.steps), float(cfg.range), labels, level)
    visualize_batch(grid, out / "traversal.png", nrow=int(cfg.steps))
    (out / "traversal.txt").write_text(
        "".join(f"row {i + 1}: {name}\n" for i, name in enumerate(directions.names))
    )


RENDER = {
    "sample": _sample,
    "reconstruct": _reconstruct,
    "interpolate": _interpolate,
    "traverse": _traverse,
}
# mode=showcase: what a README's results section shows, from any checkpoint, in one folder.
SHOWCASE = ("sample", "reconstruct", "interpolate", "traverse")


def sample_every_class(
    model: CVAE,
    per_class: int,
    temperature: float,
    generator: torch.Generator,
    out: Path,
    sampler: LatentSampler,
) -> None:
    """`samples.png`: a row of `per_class` samples for every class, named at its left (from
    the prior: the same latents in every row; an ex-post sampler: each class's own density),
    and each image as `samples/<class>/0000.png, ...`."""
    names = model.class_names
    if sampler.shared_across_classes:
        images = model.sample_classes(per_class, temperature=temperature, generator=generator)
    else:
        labels = torch.arange(len(names)).repeat_interleave(per_class)
        images = model.sample(len(labels), temperature, generator, labels, sampler)
    visualize_rows(images, names, out / "samples.png")
    folders = [folder_name(name) for name in names]  # "T-shirt/top" is one folder
    files = [f"{folder}/{i:04d}" for folder in folders for i in range(per_class)]
    save_images(images, out / "samples", files)


def _class_pair(label: object) -> tuple[int | str, int | str]:
    if not isinstance(label, list) or len(label) != 2:
        raise ValueError(
            f"label={label!r}: mode=interpolate walks between two classes, "
            "give label=[first,second]"
        )
    return label[0], label[1]
