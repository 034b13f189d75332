"""`python -m cvae.train`: build the data module, model, callbacks and trainer from a
composed config, fit (or resume), record the result and test. Tests and notebooks can call
`train` directly with a config from `hydra.compose`."""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import rich
import rich.syntax
import rich.tree
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from cvae.checkpointing import UnfinishedEpoch
from cvae.errors import Interrupted, in_multirun
from cvae.files import atomic_write
from cvae.loading import resolve_checkpoint, shown
from cvae.objective import Objective, check_objective
from cvae.quiet import one_log_stream

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


def check_resumable(checkpoint: dict, model: pl.LightningModule, path: str) -> None:
    """Resuming needs the model the checkpoint was written by: a different architecture is a
    one-line error naming the settings that differ; other differing settings (beta, lr, ...)
    are allowed and said."""
    saved, current = checkpoint["hyper_parameters"], dict(model.hparams)
    differ = [
        f"model.{k}: {saved[k]!r} there, {current[k]!r} here"
        for k in saved
        if k in current and saved[k] != current[k]
    ]
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
    checkpoint = resolve_checkpoint(cfg, cfg.task_name, resuming=True)
    if own is not None:
        log.info(
            "ckpt_path=null, but this run's folder already holds %s (epoch %d, step %d) "
            "from an earlier start (a requeued job, or the same hydra.run.dir): "
            "resuming from it",
            shown(own),
            checkpoint["epoch"] + 1,  # numbered from 1, as the progress lines and bar are
            checkpoint["global_step"],
        )
    # Callbacks first: the sampler fitted when training ends is built here, so its bad
    # settings are one line before the data is read.
    callbacks = instantiate_group(cfg.get("callbacks"))
    callbacks.append(UnfinishedEpoch())  # not a choice: without it max_steps resumes inexactly
    datamodule = instantiate(cfg.data)
    # Bad model settings are one line before the data is read, except for a conditional
    # model: its classes come from the data (and are saved in its checkpoint).
    conditional = cfg.model.get("conditional")
    model = None if conditional else instantiate(cfg.model)
    datamodule.prepare_data()
    if conditional:
        model = instantiate(cfg.model, class_names=datamodule.labelled_classes())
    if checkpoint is not None:
        check_resumable(checkpoint, model, cfg.ckpt_path)
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
            sweep = ["-m", f"hydra.sweep.dir={shown(root)}", f"hydra.sweep.subdir={subdir}"]
        skip = ("hydra.mode=", *(("hydra.sweep.dir=", "hydra.sweep.subdir=") if sweep else ()))
        overrides = [o for o in typed.hydra if not o.startswith(skip)]
        # a sweep job's own values are in `task`; the sweep itself is not resumed
        overrides += [o for o in typed.task if not o.startswith(("ckpt_path=", "hparams_search="))]
    words = [
        _python(),
        "-m",
        "cvae.train",
        *sweep[:1],
        *overrides,
        *sweep[1:],
        f"ckpt_path={shown(checkpoint)}",
    ]
    return " ".join(shlex.quote(word) for word in words)


def _test_command(trainer: pl.Trainer) -> str:
    """How to test what a stopped run trained: `cvae.evaluate` on its best checkpoint (the
    one the test would have read), else its last."""
    checkpoint = trainer.checkpoint_callback
    path = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint else ""
    words = [_python(), "-m", "cvae.evaluate", f"ckpt_path={shown(path)}"]
    return f"test it with: {' '.join(shlex.quote(word) for word in words)}"


def _python() -> str:
    """This Python as a user would type it: relative to the working folder when inside it."""
    python = os.path.relpath(sys.executable)
    return python if not python.startswith("..") else sys.executable


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
    with atomic_write(Path(output_dir) / "result.json", "w") as handle:
        handle.write(json.dumps(result, indent=2))


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (resuming from `ckpt_path` if set), then test the best checkpoint if `test`.

    Returns the final metrics; `objective.metric` among them is what a sweeper ranks by.
    """
    started = time.perf_counter()
    objective = check_objective(cfg)  # a metric the run does not log: before any work
    pl.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build(cfg)
    if rank_zero_only.rank == 0:
        print_config_tree(cfg, cfg.paths.output_dir)
    with _ranks_run_this_job():
        try:
            trainer.fit(
                model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True
            )
        except Interrupted as stop:
            if stop.requeued:  # the job comes back by itself
                message = str(stop)
            elif stop.checkpoint is None:  # after training, in the sampler fit: said there
                untested = f"; the test did not run either: {_test_command(trainer)}"
                message = f"{stop}{untested if cfg.get('test') else ''}"
            else:
                message = f"{stop}; resume with: {resume_command(cfg, stop.checkpoint)}"
            raise Interrupted(message, stop.exit_status, stop.checkpoint, stop.requeued) from None
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if trainer.is_global_zero:
            _write_result(
                cfg.paths.output_dir, trainer, metrics, time.perf_counter() - started, objective
            )
        if cfg.get("test"):
            checkpoint = trainer.checkpoint_callback
            best = checkpoint.best_model_path if checkpoint else ""
            try:
                trainer.test(
                    model, datamodule=datamodule, ckpt_path=best or None, weights_only=True
                )
            except Interrupted as stop:  # SaveOnInterrupt's "<Ctrl-C|SIGTERM>: the test stopped"
                what = str(stop).split(":", 1)[0]
                result = shown(Path(cfg.paths.output_dir) / "result.json")
                message = (
                    f"{what}: training finished (step {trainer.global_step}; {result} written), "
                    f"the test did not: {_test_command(trainer)}"
                )
                raise Interrupted(message, stop.exit_status) from None
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
