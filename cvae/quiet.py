"""Silence, by exact message, what the libraries print that a cvae user cannot act on.

Everything else they say still shows. Each entry says why it is noise here.
"""

from __future__ import annotations

import logging
import os
import warnings

# Warnings (regular expressions matched against the start of the message).
NOISE_WARNINGS = (
    # Lightning 2.6 calls a torch API that torch deprecates, once per fit.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # False for cvae: the data module saves and restores its place in the epoch (EpochSampler),
    # which Lightning does not look for; the resume tests prove the run continues exactly.
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader",
    # A resumed run writes into its own new run folder by design; the log says where.
    r"The dirpath has changed from",
    # ONNX export of a conditional model: its two inputs share the one batch dimension, as meant.
    r"# The axis name: batch will not be used, since it shares the same shape constraints",
)
# Lightning's advice to start with `srun`, given wherever the command exists: right inside a
# SLURM job (an allocation the script did not `srun`), noise on a machine that merely has SLURM
# installed, so silenced only outside a job (no SLURM_JOB_ID).
SRUN_ADVICE = r"The `srun` command is available on your system but is not used"
# Log records of Lightning's rank-zero logger whose message starts with one of these.
NOISE_LOG_PREFIXES = (
    "💡 Tip: For seamless cloud logging",  # an advertisement for a hosted service
)
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)
# Loggers that narrate ONNX export step by step at INFO level.
CHATTY_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir", "torch._dynamo")


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(NOISE_LOG_PREFIXES)


def quiet_known_noise() -> None:
    """Install the filters (idempotent); cheap, imports nothing heavy."""
    for pattern in NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if "SLURM_JOB_ID" not in os.environ:
        warnings.filterwarnings("ignore", message=SRUN_ADVICE)
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropPrefixes) for f in logger.filters):
            logger.addFilter(_DropPrefixes())
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def one_log_stream() -> None:
    """Importing `lightning` gives its logger a console handler of its own; where the root
    logger has handlers (Hydra's console and run log), every Lightning message would then
    print twice. Drop Lightning's: its messages reach the console and `<task>.log` once."""
    if logging.getLogger().hasHandlers():
        lightning_logger = logging.getLogger("lightning")
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
