"""Build and run from a composed config: the one place that reads config and wires objects.

Entry points (`cvae.train`, ...) stay thin; tests and notebooks can call these directly
with a config from `hydra.compose`.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import rich
import rich.syntax
import rich.table
import rich.tree
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cvae.callbacks import SamplerFit
from cvae.checkpointing import read_checkpoint
from cvae.data import ImageDataModule
from cvae.errors import Interrupted, in_multirun
from cvae.models import CVAE
from cvae.objective import Objective, check_objective
from cvae.quiet import one_log_stream

if TYPE_CHECKING:  # imported where used: scikit-learn loads only for a sampler
    from cvae.samplers import LatentSampler

log = logging.getLogger(__name__)
one_log_stream()
CONFIG_ORDER = ("data", "model", "trainer", "callbacks", "logger", "paths")


def print_config_tree(cfg: DictConfig, save_dir: str | Path | None = None) -> None:
    """Print the resolved config as a tree; save it (and as YAML) beside the run."""
    tree = rich.tree.Tree("config", guide_style="dim")
    keys = [k for k in CONFIG_ORDER if k in cfg] + [k for k in cfg if k not in CONFIG_ORDER]
    for key in keys:
        value = cfg[key]
        text = (
            OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        )
        tree.add(f"[bold]{key}[/bold]").add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_dir is not None:
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        with open(save_dir / "config_tree.log", "w") as handle:
            rich.print(tree, file=handle)
        OmegaConf.save(cfg, save_dir / "resolved_config.yaml", resolve=True)


def instantiate_group(group: DictConfig | None) -> list:
    """Objects of a config group holding named `_target_` entries (callbacks, loggers)."""
    if not group:
        return []
    return [instantiate(entry) for entry in group.values() if entry and "_target_" in entry]


def newest_last_checkpoint(log_dir: str | Path, task: str = "*") -> str:
    """`ckpt_path=last`: the most recently written `last.ckpt` of the single runs of `task`
    (`*`: any training task; sweep jobs under `multiruns/` are never picked)."""
    pattern = f"{task}/runs/*/checkpoints/last.ckpt"
    found = sorted(Path(log_dir).glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no {Path(log_dir) / pattern} yet (train first)")
    return str(found[-1])


def resolve_checkpoint(cfg: DictConfig, task: str = "*") -> dict | None:
    """The checkpoint `cfg.ckpt_path` names (`last` replaced by the file it means, and said),
    read and checked to be a cvae checkpoint: a damaged or foreign file is a one-line error
    before anything starts."""
    path = cfg.get("ckpt_path")
    if not path:
        return None
    if path == "last":
        path = cfg.ckpt_path = newest_last_checkpoint(cfg.paths.log_dir, task)
        log.info("ckpt_path=last: %s", path)
    return read_checkpoint(path)


def check_resumable(checkpoint: dict, model: pl.LightningModule, path: str) -> None:
    """Resuming needs the model the checkpoint was written by: a different architecture is a
    one-line error naming the settings that differ; other differing settings (beta, lr, ...)
    are allowed and said."""
    saved, current = checkpoint["hyper_parameters"], dict(model.hparams)
    differ = [f"model.{k}: {saved[k]!r} there, {current[k]!r} here"
              for k in saved if k in current and saved[k] != current[k]]  # fmt: skip
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    if shapes != stored:
        raise ValueError(
            f"ckpt_path={path} was written by another model ({'; '.join(differ) or 'weights'}): "
            "resume with the overrides of the run that wrote it (its .hydra/overrides.yaml)"
        )
    if differ:
        log.warning("resuming %s with other settings: %s", path, "; ".join(differ))


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Data module, model and trainer, failing on bad input before any training: the
    checkpoint to resume from is read, the data found (and decoded into its cache)."""
    own = _own_last_checkpoint(cfg)
    checkpoint = resolve_checkpoint(cfg, cfg.task_name)
    if own is not None:
        log.info("ckpt_path=null, but this run's folder already holds %s (epoch %d, step %d) "
                 "from an earlier start (a requeued job, or the same hydra.run.dir): "
                 "resuming from it", _shown(own), checkpoint["epoch"],
                 checkpoint["global_step"])  # fmt: skip
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    # A conditional model's classes come from the data (and are saved in its checkpoint).
    classes = {"class_names": datamodule.labelled_classes()} if cfg.model.get("conditional") else {}
    model = instantiate(cfg.model, **classes)
    if checkpoint is not None:
        check_resumable(checkpoint, model, cfg.ckpt_path)
    callbacks = instantiate_group(cfg.get("callbacks"))
    if cfg.get("sampler") is not None and cfg.sampler.name != "prior":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        fit = partial(fit_sampler, cfg, out=Path(cfg.paths.output_dir))
        callbacks.append(SamplerFit(str(cfg.sampler.name), fit, last, int(cfg.seed)))
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_group(cfg.get("logger")) or False
    )
    return datamodule, model, trainer


def _own_last_checkpoint(cfg: DictConfig) -> Path | None:
    """With `ckpt_path` null, this run's own `checkpoints/last.ckpt`, if its folder has one,
    set as `ckpt_path`. A fresh run gets a fresh folder, so only a run started again in its
    folder has one: a SLURM job requeued after its time limit or a preemption (same job,
    same folder), or a single run given the same `hydra.run.dir` again."""
    if cfg.get("ckpt_path"):
        return None
    own = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    if not own.is_file():
        return None
    cfg.ckpt_path = str(own)
    return own


def resume_command(cfg: DictConfig, checkpoint: str | Path) -> str:
    """The command line that continues this run from `checkpoint`: this run's overrides with
    `ckpt_path` set to it (a `hydra.run.dir` the user chose is kept: the run goes on there;
    otherwise it goes on in a new run folder). A job of a submitit launcher (SLURM) gets a
    one-job sweep through the same launcher, into the same job folder: it runs on the
    cluster, not here."""
    from hydra.core.hydra_config import HydraConfig

    overrides, sweep = [], []
    if HydraConfig.initialized():  # what the user typed: Hydra's own settings, then the task's
        hydra_cfg = HydraConfig.get()
        typed = hydra_cfg.overrides
        launcher = str(hydra_cfg.launcher.get("_target_", "")) if in_multirun() else ""
        if "submitit" in launcher:
            job = Path(hydra_cfg.runtime.output_dir)
            subdir = Path(str(hydra_cfg.sweep.subdir))
            root = Path(*job.parts[: -len(subdir.parts)])
            sweep = ["-m", f"hydra.sweep.dir={_shown(root)}", f"hydra.sweep.subdir={subdir}"]
        skip = ("hydra.mode=", *(("hydra.sweep.dir=", "hydra.sweep.subdir=") if sweep else ()))
        overrides = [o for o in typed.hydra if not o.startswith(skip)]
        # a sweep job's own values are in `task`; the sweep itself is not resumed
        overrides += [o for o in typed.task if not o.startswith(("ckpt_path=", "hparams_search="))]
    python = os.path.relpath(sys.executable)
    words = [python if not python.startswith("..") else sys.executable, "-m", "cvae.train",
             *sweep[:1], *overrides, *sweep[1:], f"ckpt_path={_shown(checkpoint)}"]  # fmt: skip
    return " ".join(shlex.quote(word) for word in words)


def _shown(path: str | Path) -> str:
    """A path as a user would type it: relative to the working folder when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def _write_result(
    output_dir: str,
    trainer: pl.Trainer,
    metrics: dict[str, float],
    seconds: float,
    objective: Objective,
) -> None:
    """`result.json`: what a sweep summary lists for this run."""
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_score if checkpoint is not None else None
    result = {
        "objective": {"metric": list(objective.metrics), "direction": list(objective.directions)},
        "final": {k: v for k, v in metrics.items() if k.startswith("val/")},
        "best_val_loss": float(best) if best is not None else metrics.get("val/loss"),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "wall_seconds": round(seconds, 1),
        "checkpoint": (checkpoint.best_model_path or checkpoint.last_model_path)
        if checkpoint is not None
        else None,
    }
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "result.json").write_text(json.dumps(result, indent=2))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming from `ckpt_path` if set), then test the best checkpoint if `test`.

    Returns the final metrics; `objective.metric` among them is what a sweeper ranks by.
    """
    started = time.perf_counter()
    objective = check_objective(cfg)  # a metric the run does not log: before any work
    sampler_of(cfg)  # and bad sampler settings, not after hours of training
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    if rank_zero_only.rank == 0:
        print_config_tree(cfg, cfg.paths.output_dir)
    with _ranks_run_this_job():
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"),
                        weights_only=True)  # fmt: skip
        except Interrupted as stop:
            command = resume_command(cfg, stop.checkpoint)
            message = f"{stop}; resume with: {command}"
            raise Interrupted(message, stop.exit_status, stop.checkpoint) from None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            _write_result(cfg.paths.output_dir, trainer, metrics, time.perf_counter() - started,
                          objective)  # fmt: skip
        if cfg.get("test"):
            checkpoint = trainer.checkpoint_callback
            best = checkpoint.best_model_path if checkpoint else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    log.info("output folder: %s", cfg.paths.output_dir)
    return metrics


@contextmanager
def _ranks_run_this_job() -> Iterator[None]:
    """Lightning starts DDP ranks > 0 by re-running `sys.argv` in this run's folder. In a
    sweep job that would be a sweep of their own (other configs, other folders): give them
    this job's overrides, in single-run mode, and this job's folder. Afterwards close the
    job's process group and undo what the launch set (environment, threads), so the next
    job launches ranks of its own."""
    if not in_multirun():
        yield
        return
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    argv, environment, threads = sys.argv, dict(os.environ), torch.get_num_threads()
    sys.argv = [argv[0], *hydra_cfg.overrides.task, "hydra.mode=RUN"]
    with read_write(hydra_cfg), open_dict(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environment)
        torch.set_num_threads(threads)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(cfg: DictConfig) -> CVAE:
    """The model of `cfg.ckpt_path` (`last`: the newest training run's) on `cfg.device`, in
    eval mode."""
    resolve_checkpoint(cfg)
    model = CVAE.load_from_checkpoint(
        cfg.ckpt_path, map_location=_device(cfg.device), weights_only=True
    )
    return model.eval()


def load_checkpoint(cfg: DictConfig) -> tuple[CVAE, ImageDataModule]:
    """The model of `cfg.ckpt_path` on `cfg.device`, and its data: `cfg.data` if given, else
    the data settings saved in the checkpoint. Fails early when they do not fit together."""
    model = load_model(cfg)
    path = Path(str(cfg.ckpt_path))
    if cfg.get("data"):
        datamodule = instantiate(cfg.data)
    else:
        datamodule = ImageDataModule.load_from_checkpoint(path, weights_only=True)
    data, hp = datamodule.hparams, model.hparams
    for key, expected in (("image_size", hp.image_size), ("channels", hp.in_channels)):
        if data[key] != expected:
            raise ValueError(
                f"data.{key}={data[key]} does not fit the checkpoint's model ({expected})"
            )
    return model, datamodule


def sampler_of(cfg: DictConfig) -> LatentSampler | None:
    """The (unfitted) sampler `cfg.sampler` names, with its settings; None for `prior`."""
    from cvae.samplers import build_sampler

    settings = OmegaConf.to_container(cfg.sampler, resolve=True)
    return build_sampler(str(settings.pop("name")), **settings)


def fit_sampler(
    cfg: DictConfig, model: CVAE, datamodule: ImageDataModule, checkpoint: str | Path, out: Path
) -> tuple[LatentSampler, Path]:
    """Fit `cfg.sampler` to the posteriors of `model`'s training images and save it beside
    `checkpoint` (what `sampler=...` then loads); `out/sampler.json` records the fit.
    `cvae.generate mode=fit` and the end of training (`callbacks.SamplerFit`) come here."""
    from cvae.samplers import posteriors

    sampler, name = sampler_of(cfg), cfg.sampler.name
    if sampler is None:
        raise ValueError("sampler=prior has nothing to fit: mode=fit takes sampler=gmm or "
                         "sampler=two_stage")  # fmt: skip
    datamodule.setup("fit")
    mu, log_var, labels = posteriors(model, datamodule.train_dataloader(), sampler.max_images,
                                     progress=True)  # fmt: skip
    settings = ", ".join(f"{k}={v}" for k, v in sampler.settings().items())
    log.info("sampler=%s (%s): fitting to the posteriors of %d training images; no progress "
             "lines until it ends (minutes on a CPU)", name, settings, len(mu))  # fmt: skip
    started = time.perf_counter()
    path = sampler.fit(mu, log_var, labels).save(checkpoint)
    record = {"sampler": name, "settings": sampler.settings(), "fit": str(path),
              "images": len(mu), "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampler.json").write_text(json.dumps(record, indent=2) + "\n")
    log.info("sampler=%s fitted in %.0f s: %s (cvae.generate and eval.fid draw from it with "
             "sampler=%s)", name, record["seconds"], path, name)  # fmt: skip
    return sampler, path


def fitted_sampler(cfg: DictConfig) -> LatentSampler | None:
    """`cfg.sampler` as fitted to `cfg.ckpt_path` and saved beside it (None: `prior`); a
    one-line error saying how to fit it when it is not."""
    sampler = sampler_of(cfg)
    return None if sampler is None else sampler.load(cfg.ckpt_path)


def evaluate_checkpoint(cfg: DictConfig) -> dict:
    """Metrics of a checkpoint on a split, printed as a table and saved as metrics.json in
    the evaluation's own folder (see `evaluation_folder`), which also keeps every finished
    chunk of images: the same command continues an interrupted evaluation."""
    from cvae.metrics import evaluate_model

    ev = cfg.eval
    model, datamodule, split = _evaluation_data(cfg)
    extractor = sampler = None
    if ev.get("fid"):  # the feature network and sampler first: a bad one stops before any work
        if int(ev.fid_samples) < 2:
            raise ValueError(f"eval.fid_samples must be >= 2, got {ev.fid_samples}")
        from cvae.fid import feature_extractor

        sampler = fitted_sampler(cfg)

        hp = model.hparams  # a feature network file is probed at the data's channels and size
        extractor = feature_extractor(ev.get("fid_features"), ev.get("fid_weights"),
                                      hp.in_channels, hp.image_size)  # fmt: skip
    loader = _with_model_labels(_evaluation_loader(datamodule, split), model, datamodule)
    options = {"iw_samples": int(ev.iw_samples), "seed": int(ev.seed),
               "max_images": ev.max_images, "chunk_images": int(ev.get("chunk_images", 64)),
               "max_decodes": ev.get("max_decodes")}  # fmt: skip
    folder = evaluation_folder(cfg, model, datamodule, split, options)
    log.info("evaluating %s, %s split, K=%d: results in %s", cfg.ckpt_path, split,
             options["iw_samples"], folder)  # fmt: skip
    metrics = evaluate_model(model, loader, **options, folder=folder,
                             progress=bool(ev.get("progress", True)))  # fmt: skip
    if extractor is not None:
        from cvae.fid import sample_quality

        metrics.update(sample_quality(
            model, loader, samples=int(ev.fid_samples), seed=int(ev.seed), extractor=extractor,
            batch_size=int(ev.get("fid_batch_size", 64)), progress=bool(ev.get("progress", True)),
            sampler=sampler,
        ))  # fmt: skip
        metrics["fid_sampler"] = str(cfg.sampler.name)
        if ev.get("fid_features"):  # these FIDs compare only with FIDs of the same file
            metrics["fid_features"] = str(extractor.path)
    metrics = {"ckpt_path": str(cfg.ckpt_path), "split": split, **metrics}
    settings = {"model": dict(model.hparams), "data": dict(datamodule.hparams)}
    (folder / "metrics.json").write_text(json.dumps({**metrics, **settings}, indent=2))
    print_metrics(metrics)
    log.info("metrics written to %s", folder / "metrics.json")
    return metrics


# Data settings that change how images are read, not which images or pixels: left out of
# an evaluation's identity.
LOADER_ONLY = ("batch_size", "num_workers", "pin_memory", "persistent_workers",
               "prefetch_factor", "cache", "cache_dir", "cache_workers", "on_device",
               "download", "strict")  # fmt: skip


def evaluation_folder(
    cfg: DictConfig, model: CVAE, datamodule: ImageDataModule, split: str, options: dict
) -> Path:
    """`<paths.output_dir>/<checkpoint stem>-<split>-k<K>-<hash>/`: one folder per checkpoint
    file (by content), split, evaluation options, device type and data settings, so the same
    command finds the chunks an interrupted run left, and any other evaluation starts a
    folder of its own. Holds `settings.json` (what the hash covers) and `config.yaml`."""
    import hashlib

    path = Path(str(cfg.ckpt_path))
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    digest = digest.hexdigest()
    data = {k: v for k, v in dict(datamodule.hparams).items() if k not in LOADER_ONLY}
    identity = {"checkpoint_sha256": digest, "split": split, **options,
                "device": model.device.type, "data": data}  # fmt: skip
    text = json.dumps(identity, indent=2, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:10]
    folder = Path(cfg.paths.output_dir) / f"{path.stem}-{split}-k{options['iw_samples']}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(text + "\n")
    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    return folder


def _evaluation_data(cfg: DictConfig) -> tuple[CVAE, ImageDataModule, str]:
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
        log.info("data.root=%s: images read as %d channel(s), %dx%d, as the checkpoint's model",
                 cfg.data.root, hp.in_channels, hp.image_size, hp.image_size)  # fmt: skip
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


def _evaluation_loader(datamodule: ImageDataModule, split: str):
    """Batches of the split, in a fixed order; `all`: every usable image of the source."""
    if split != "all":
        datamodule.setup("test")
        return getattr(datamodule, f"{split}_dataloader")()
    from cvae.data.datamodule import _binarized

    datamodule.hparams.val_fraction = datamodule.hparams.test_fraction = 0.0
    datamodule.setup("test")
    every = datamodule.train_set  # with no val or test share: all of them
    if datamodule.hparams.binarize:  # fixed bits, as a val or test split gets them
        every = _binarized(every, seed=datamodule.hparams.split_seed)
    datamodule.test_set = every
    return datamodule.test_dataloader()  # the test loader's sequential order


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


def _with_model_labels(loader, model: CVAE, datamodule: ImageDataModule):
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
    log.info("classes of %s matched to the checkpoint's by name: %s", where,
             ", ".join(f"{n} -> {int(i)}" for n, i in zip(names, table, strict=True)))  # fmt: skip
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
        table.add_row(key, str(value))
    rich.print(table)
