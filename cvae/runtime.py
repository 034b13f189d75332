"""Build and run from a composed config: the one place that reads config and wires objects.

Entry points (`cvae.train`, ...) stay thin; tests and notebooks can call these directly
with a config from `hydra.compose`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import lightning.pytorch as pl
import rich
import rich.syntax
import rich.table
import rich.tree
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import MissingMandatoryValue

from cvae.data import ImageDataModule
from cvae.data.decode import ImageDecodeError
from cvae.models import CVAE

log = logging.getLogger(__name__)

# Errors that mean "the input is wrong", reported as one line instead of a traceback.
INPUT_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    ImageDecodeError,
    FloatingPointError,
    MissingMandatoryValue,
)
CONFIG_ORDER = ("data", "model", "trainer", "callbacks", "logger", "paths")


def user_error(error: BaseException) -> BaseException | None:
    """The input error behind `error`, if it is one: anything that failed while building an
    object from the config (Hydra wraps it), or one of `INPUT_ERRORS`."""
    if isinstance(error, InstantiationException):
        while error.__cause__ is not None:
            error = error.__cause__
        return error
    return error if isinstance(error, INPUT_ERRORS) else None


def error_line(error: BaseException) -> str:
    """The one line to show for an input error.

    An error raised in a DataLoader worker reaches us as "Caught ... in DataLoader worker
    process N" with the original traceback in the message: its last line is the real error.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "Original Traceback" in str(error) else lines[0]


T = TypeVar("T")


def run_or_report(run: Callable[[DictConfig], T], cfg: DictConfig) -> T:
    """`run(cfg)`, turning an input error into `error: <one line>` and exit status 1."""
    try:
        return run(cfg)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"error: {error_line(cause)}", file=sys.stderr)
        if _in_multirun():  # let Hydra record this job as failed and go on with the others
            raise
        sys.exit(1)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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


def checkpoint_file(path: str | Path) -> Path:
    """`path`, or a one-line error naming the key when it is not a file."""
    if not Path(str(path)).is_file():
        raise FileNotFoundError(f"ckpt_path={path} is not a checkpoint file")
    return Path(str(path))


def newest_last_checkpoint(runs_dir: Path) -> str:
    """`ckpt_path=last`: the most recently written `last.ckpt` of this task's runs."""
    found = sorted(runs_dir.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no {runs_dir}/*/checkpoints/last.ckpt")
    return str(found[-1])


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Data module, model and trainer, failing on bad input before any training."""
    if cfg.get("ckpt_path") == "last":
        cfg.ckpt_path = newest_last_checkpoint(Path(cfg.paths.log_dir) / cfg.task_name / "runs")
        log.info("resuming from %s", cfg.ckpt_path)
    if cfg.get("ckpt_path"):
        checkpoint_file(cfg.ckpt_path)
    datamodule = instantiate(cfg.data)
    # A conditional model's classes come from the data (and are saved in its checkpoint).
    classes = {"class_names": datamodule.labelled_classes()} if cfg.model.get("conditional") else {}
    model = instantiate(cfg.model, **classes)
    trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    return datamodule, model, trainer


def _write_result(
    output_dir: str, trainer: pl.Trainer, metrics: dict[str, float], seconds: float
) -> None:
    """`result.json`: what a sweep summary lists for this run."""
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_score if checkpoint is not None else None
    result = {
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

    Returns the final metrics, `val/loss` among them (what a sweeper minimises).
    """
    if rank_zero_only.rank == 0:
        print_config_tree(cfg, cfg.paths.output_dir)
    started = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    with _ranks_run_this_job():
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            _write_result(cfg.paths.output_dir, trainer, metrics, time.perf_counter() - started)
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
    if not _in_multirun():
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
    """The model of `cfg.ckpt_path` on `cfg.device`, in eval mode."""
    path = checkpoint_file(cfg.ckpt_path)
    model = CVAE.load_from_checkpoint(path, map_location=_device(cfg.device), weights_only=True)
    return model.eval()


def load_checkpoint(cfg: DictConfig) -> tuple[CVAE, ImageDataModule]:
    """The model of `cfg.ckpt_path` on `cfg.device`, and its data: `cfg.data` if given, else
    the data settings saved in the checkpoint. Fails early when they do not fit together."""
    path = Path(str(cfg.ckpt_path))
    model = load_model(cfg)
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


def evaluate(cfg: DictConfig) -> dict:
    """Metrics of a checkpoint on a split, printed as a table and saved as metrics.json."""
    from cvae.metrics import evaluate as evaluate_model

    model, datamodule = load_checkpoint(cfg)
    if cfg.eval.batch_size:
        datamodule.hparams.batch_size = int(cfg.eval.batch_size)
    split = cfg.eval.split
    if split not in ("train", "val", "test"):
        raise ValueError(f"eval.split={split!r} is not one of train, val, test")
    if split == "train" and datamodule.hparams.binarize:
        raise ValueError(
            "eval.split=train with data.binarize=true: training images are binarised afresh "
            "at every training step, so there is no fixed train set; evaluate val or test"
        )
    datamodule.setup("test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    metrics = evaluate_model(
        model, loader, iw_samples=int(cfg.eval.iw_samples), seed=int(cfg.eval.seed),
        max_images=cfg.eval.max_images,
    )  # fmt: skip
    metrics = {"ckpt_path": str(cfg.ckpt_path), "split": split, **metrics}
    settings = {"model": dict(model.hparams), "data": dict(datamodule.hparams)}
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps({**metrics, **settings}, indent=2))
    print_metrics(metrics)
    log.info("metrics written to %s", output_dir / "metrics.json")
    return metrics


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
