"""The loading floor every command stands on: which checkpoint `ckpt_path` means, the model
and data it holds, and the sampler a command draws from. Entry points read a config here;
the model and data wings below never do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cvae.checkpointing import read_checkpoint
from cvae.data import ImageDataModule
from cvae.errors import CheckpointError, Interrupted, stopped_by
from cvae.models import CVAE, from_checkpoint
from cvae.samplers import LatentSampler, fitted_for

log = logging.getLogger(__name__)
SHOWN_TENSORS = 3  # how many non-finite tensors an error names


def device(name: str) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def shown(path: str | os.PathLike) -> str:
    """A path as a user would type it: relative to the working folder when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def newest_last_checkpoint(log_dir: str | Path, task: str = "*") -> str:
    """`ckpt_path=last`: the most recently written `last.ckpt` of the single runs of `task`
    (`*`: any training task; sweep jobs under `multiruns/` are never picked)."""
    pattern = f"{task}/runs/*/checkpoints/last.ckpt"
    found = sorted(Path(log_dir).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no {Path(log_dir) / pattern} yet (train first)")
    return str(found[-1])


def last_checkpoint_in(folder: Path) -> str:
    """`ckpt_path=<a folder>`: the newest `last.ckpt` in it or in a `checkpoints/` under it
    (a run folder's own; a sweep folder's, of the job that wrote last)."""
    found = [folder / "last.ckpt"] if (folder / "last.ckpt").is_file() else []
    found += folder.glob("**/checkpoints/last.ckpt")
    if not found:
        raise CheckpointError(
            f"ckpt_path={folder} is a folder without a checkpoints/last.ckpt: give a run "
            "folder, a sweep folder or a .ckpt file"
        )
    return str(max(found, key=lambda p: p.stat().st_mtime))


def resolve_checkpoint(cfg: DictConfig, task: str = "*", resuming: bool = False) -> dict | None:
    """The checkpoint `cfg.ckpt_path` names (`last`, or a run or sweep folder, replaced by the
    file it means, and said first), read and checked to be a cvae checkpoint with finite
    weights: a damaged or foreign file, or one whose weights hold NaN, is a one-line error
    before anything starts."""
    path = cfg.get("ckpt_path")
    if not path:
        return None
    if path == "last":
        path = cfg.ckpt_path = newest_last_checkpoint(cfg.paths.log_dir, task)
        log.info("ckpt_path=last: %s", path)
    elif Path(path).expanduser().is_dir():
        folder = path
        path = cfg.ckpt_path = last_checkpoint_in(Path(folder).expanduser())
        log.info("ckpt_path=%s: %s", folder, shown(path))
    checkpoint = read_checkpoint(path)
    use = "resume from" if resuming else "use"
    check_finite_weights(checkpoint, path, f"{use} an earlier checkpoint of that run")
    return checkpoint


def check_finite_weights(checkpoint: dict, path: str | os.PathLike, advice: str) -> None:
    """A one-line error naming the checkpoint's weight tensors that hold NaN or infinite
    values, ending with `advice`: otherwise such a model evaluates to NaN, samples black
    images and exports, all without a word."""
    weights = checkpoint["state_dict"]
    bad = [
        name
        for name, tensor in weights.items()
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not tensor.isfinite().all()
    ]
    if not bad:
        return
    named = ", ".join(bad[:SHOWN_TENSORS])
    more = f" and {len(bad) - SHOWN_TENSORS} more" if len(bad) > SHOWN_TENSORS else ""
    raise CheckpointError(
        f"ckpt_path={path} holds weights that are not finite (NaN or infinite values in "
        f"{len(bad)} of its {len(weights)} tensors: {named}{more}): {advice}"
    )


def load_model(cfg: DictConfig) -> CVAE:
    """The model of `cfg.ckpt_path` (`last`: the newest training run's) on `cfg.device`, in
    eval mode."""
    return from_checkpoint(resolve_checkpoint(cfg), device(cfg.device))


def load_checkpoint(cfg: DictConfig) -> tuple[CVAE, ImageDataModule]:
    """The model of `cfg.ckpt_path` on `cfg.device`, and its data: `cfg.data` if given, else
    the data settings saved in the checkpoint. Fails early when they do not fit together."""
    model = load_model(cfg)
    if cfg.get("data"):
        datamodule = instantiate(cfg.data)
    else:
        datamodule = ImageDataModule.load_from_checkpoint(str(cfg.ckpt_path), weights_only=True)
    data, hp = datamodule.hparams, model.hparams
    for key, expected in (("image_size", hp.image_size), ("channels", hp.in_channels)):
        if data[key] != expected:
            raise ValueError(
                f"data.{key}={data[key]} does not fit the checkpoint's model ({expected})"
            )
    return model, datamodule


def sampler(cfg: DictConfig) -> LatentSampler:
    """The sampler `cfg.sampler` configures (`conf/sampler/`), unfitted: settings checked,
    one line naming the key when they are bad."""
    return instantiate(cfg.sampler)


def fitted_sampler(
    cfg: DictConfig, model: CVAE, datamodule: ImageDataModule, refit: bool = False
) -> LatentSampler:
    """`cfg.sampler` as fitted to `cfg.ckpt_path` and saved beside it (the prior: itself),
    fitted now to `model`'s training images when it is not, or `refit` (`samplers.
    fitted_for`); the record of a new fit goes to the command's output folder. Stopped by
    Ctrl-C or SIGTERM during a fit, one line says what is not done (a fit has no partial
    result to keep) and that the same command fits it."""
    chosen = sampler(cfg)
    try:
        return fitted_for(
            chosen,
            model,
            lambda: datamodule.ordered_dataloader("train"),
            cfg.ckpt_path,
            cfg.paths.output_dir,
            refit,
        )
    except KeyboardInterrupt as stop:
        what, status = stopped_by(stop)
        raise Interrupted(
            f"{what}: sampler={chosen.name} was not fitted to {cfg.ckpt_path}; the same "
            "command fits it",
            status,
        ) from None
