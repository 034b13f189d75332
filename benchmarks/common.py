"""What the training benchmarks share: the machine's matmul rate, FLOP counts, configs."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def machine() -> str:
    """One line naming what the figures were measured on."""
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads{gpu}; torch {torch.__version__}"
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, seconds: float = 2.0
) -> float:
    """Dense matmul FLOP/s on `device`: the best of several timed rounds (the machine's ceiling
    for the work convolutions lower to)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    flops = 2 * size**3
    a @ b
    synchronize(device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 5 if device.type == "cpu" else 50
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        synchronize(device)
        best = max(best, reps * flops / (time.perf_counter() - started))
    return best


def training_flops(model: torch.nn.Module, batch: torch.Tensor, loss_fn) -> float:
    """FLOPs of one training step (forward and backward) per image, as
    `torch.utils.flop_counter` counts them (matmuls and convolutions)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model, batch).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(batch)


def compose_train(output_dir: Path, overrides: list[str]) -> DictConfig:
    """The training config as `python -m cvae.train` composes it, writing into `output_dir`,
    without the sampler fit at the end (`sampler=prior`): benchmarks time training, and
    sample_quality fits its samplers itself."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            "train", overrides=[f"paths.output_dir={output_dir}", "sampler=prior", *overrides]
        )
