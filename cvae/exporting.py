"""What `python -m cvae.export ckpt_path=PATH format=torchscript|onnx` does, usable from Python.

Writes `encoder.<ext>` (images in [0, 1], `(B, C, H, W)` float32 -> `mu`, `log_var`) and
`decoder.<ext>` (latents `(B, latent_dim)` -> images in [0, 1]), loadable without cvae:
`torch.jit.load("encoder.pt")` or an ONNX runtime. The batch size is free. A conditional
model's networks take the class too: `encoder(images, labels)`, `decoder(z, labels)`, labels
int64 class indices `(B,)` (the names are `class_names` in the checkpoint's hyperparameters).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from cvae.loading import load_model
from cvae.models import CVAE

log = logging.getLogger(__name__)
FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}


def export(model: CVAE, folder: str | Path, format: str = "torchscript") -> dict[str, Path]:
    """Write the networks of `model` (in eval mode) that `CVAE.exportable` names to `folder`."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    paths = {}
    for part, (module, example, inputs, outputs) in model.exportable().items():
        path = folder / f"{part}{FORMATS[format]}"
        if format == "torchscript":
            with torch.no_grad():
                torch.jit.trace(module, example).save(str(path))
        else:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=tuple({0: batch} for _ in example),
                dynamo=True,
                external_data=False,  # one self-contained file per network
                verbose=False,  # no step-by-step progress lines
            )
        paths[part] = path
    log.info("exported %s to %s", ", ".join(p.name for p in paths.values()), folder)
    return paths


def run(cfg: DictConfig) -> dict[str, Path]:
    return export(load_model(cfg), cfg.paths.output_dir, cfg.format)
