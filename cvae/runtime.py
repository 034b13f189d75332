"""Build and run from a composed config: the one place that reads config and wires objects.

Entry points (`cvae.train`, ...) stay thin; tests and notebooks can call these directly
with a config from `hydra.compose`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import rich
import rich.syntax
import rich.tree
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from cvae.data.decode import ImageDecodeError

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


def build(cfg: DictConfig) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer]:
    """Data module, model and trainer, failing on bad input before any training."""
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} is not a checkpoint file")
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_group(cfg.get("callbacks")),
        logger=instantiate_group(cfg.get("logger")) or False,
    )
    return datamodule, model, trainer


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming from `ckpt_path` if set), then test the best checkpoint if `test`.

    Returns the final metrics, `val/loss` among them (what a sweeper minimises).
    """
    print_config_tree(cfg, cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    log.info("output folder: %s", cfg.paths.output_dir)
    return metrics
