"""Generate with a checkpoint: `python -m cvae.generate ckpt_path=PATH mode=...`.

`sample` draws from the prior, `reconstruct` shows every image of a folder beside its
reconstruction, `interpolate` walks between two images (grid and GIF), `traverse` sweeps
the latent dimensions that carry the most information. Output: outputs/generate/<timestamp>/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cvae.data import ImageDataModule, index_folder
from cvae.data.decode import ImageDecodeError, Preprocess
from cvae.errors import run_or_report
from cvae.metrics import PosteriorStatistics
from cvae.models import CVAE
from cvae.models.networks import unit_range
from cvae.runtime import load_checkpoint
from cvae.viz import interleave_rows, save_gif, save_images, visualize_batch

log = logging.getLogger(__name__)
MODES = ("sample", "reconstruct", "interpolate", "traverse")


def load_folder(folder: str | Path, preprocess: Preprocess) -> tuple[torch.Tensor, list[Path]]:
    """Every decodable image under `folder` as a uint8 batch, decoded as training data is."""
    images, names = [], []
    for path in index_folder(folder, key="input").files:
        try:
            images.append(torch.from_numpy(preprocess.load(path)))
            names.append(path)
        except ImageDecodeError as error:
            log.warning("skipped: %s", error)
    if not images:
        raise ValueError(f"input={folder} holds no decodable image")
    return torch.stack(images), names


def pick_images(
    inputs: str | list[str] | None,
    count: int,
    datamodule: ImageDataModule,
    generator: torch.Generator,
) -> torch.Tensor:
    """`count` images: the given files, or random ones from the test split."""
    preprocess = datamodule.preprocess
    if isinstance(inputs, str):
        inputs = [inputs]
    if inputs:
        if len(inputs) != count:
            raise ValueError(f"input needs {count} image file(s), got {len(inputs)}")
        return torch.stack([torch.from_numpy(preprocess.load(path)) for path in inputs])
    datamodule.setup("test")
    test_set = datamodule.test_set
    chosen = torch.randperm(len(test_set), generator=generator)[:count]
    return torch.stack([test_set[int(i)][0] for i in chosen])


def latent_kl(model: CVAE, datamodule: ImageDataModule, max_images: int = 1024) -> torch.Tensor:
    """Mean KL of each latent dimension over (up to `max_images` of) the test split."""
    datamodule.setup("test")
    statistics, seen = PosteriorStatistics(), 0
    for images, _ in datamodule.test_dataloader():
        with torch.no_grad():
            statistics.update(*model.encode(images.to(model.device)))
        seen += len(images)
        if seen >= max_images:
            break
    return statistics.kl_per_dim()


def traverse(
    model: CVAE, image: torch.Tensor, dims: list[int], steps: int, span: float
) -> torch.Tensor:
    """Rows of images: for each of `dims`, the posterior mean with that coordinate set to
    `steps` values from -span to span."""
    with torch.no_grad():
        mu, _ = model.encode(image[None].to(model.device))
    values = torch.linspace(-span, span, steps, device=model.device)
    z = mu.repeat(len(dims) * steps, 1)
    for row, dim in enumerate(dims):
        z[row * steps : (row + 1) * steps, dim] = values
    with torch.no_grad():
        return model.decode(z)


def generate(cfg: DictConfig) -> Path:
    if cfg.mode not in MODES:
        raise ValueError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    model, datamodule = load_checkpoint(cfg)
    model.eval()
    generator = torch.Generator().manual_seed(int(cfg.seed))
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.mode == "sample":
        images = model.sample(int(cfg.n), temperature=float(cfg.temperature), generator=generator)
        visualize_batch(images, out / "samples.png", nrow=cfg.nrow)
        save_images(images, out / "samples")
    elif cfg.mode == "reconstruct":
        if not cfg.input:
            raise ValueError("mode=reconstruct needs input=DIR, a folder of images")
        inputs, paths = load_folder(cfg.input, datamodule.preprocess)
        outputs = torch.cat([model.reconstruct(batch) for batch in inputs.split(256)]).cpu()
        columns = min(cfg.nrow, len(inputs))
        visualize_batch(interleave_rows(inputs, outputs, columns), out / "reconstructions.png",
                        nrow=columns)  # fmt: skip
        side_by_side = torch.cat([unit_range(inputs), outputs], dim=-1)
        root = Path(cfg.input).expanduser().resolve()
        save_images(side_by_side, out / "pairs", [p.relative_to(root) for p in paths])
    elif cfg.mode == "interpolate":
        first, second = pick_images(cfg.input, 2, datamodule, generator)
        frames = model.interpolate(first, second, int(cfg.steps), spherical=bool(cfg.spherical))
        visualize_batch(frames, out / "interpolation.png", nrow=len(frames))
        save_gif(frames, out / "interpolation.gif")
    else:
        (image,) = pick_images(cfg.input, 1, datamodule, generator)
        dims = latent_kl(model, datamodule).argsort(descending=True)[: int(cfg.dims)].tolist()
        grid = traverse(model, image, dims, int(cfg.steps), float(cfg.range))
        visualize_batch(grid, out / "traversal.png", nrow=int(cfg.steps))
        (out / "traversal_dims.txt").write_text(" ".join(map(str, dims)) + "\n")
    log.info("%s: images written to %s", cfg.mode, out)
    return out


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    run_or_report(generate, cfg)


if __name__ == "__main__":
    main()
