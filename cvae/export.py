"""Export a checkpoint: `python -m cvae.export ckpt_path=PATH format=torchscript|onnx`.

Writes `encoder.<ext>` (images in [0, 1], `(B, C, H, W)` float32 -> `mu`, `log_var`) and
`decoder.<ext>` (latents `(B, latent_dim)` -> images in [0, 1]), loadable without cvae:
`torch.jit.load("encoder.pt")` or an ONNX runtime. The batch size is free.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from cvae.errors import run_or_report
from cvae.models import CVAE
from cvae.runtime import load_model

log = logging.getLogger(__name__)
FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}


def export(model: CVAE, folder: str | Path, format: str = "torchscript") -> dict[str, Path]:
    """Write the encoder and decoder of `model` (in eval mode) to `folder`."""
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    hp = model.hparams
    examples = {
        "encoder": (model.encoder, torch.rand(2, hp.in_channels, hp.image_size, hp.image_size)),
        "decoder": (model.decoder, torch.randn(2, hp.latent_dim)),
    }
    names = {"encoder": (["images"], ["mu", "log_var"]), "decoder": (["z"], ["images"])}
    paths = {}
    for part, (module, example) in examples.items():
        path = folder / f"{part}{FORMATS[format]}"
        example = example.to(model.device)
        if format == "torchscript":
            with torch.no_grad():
                torch.jit.trace(module, example).save(str(path))
        else:
            inputs, outputs = names[part]
            torch.onnx.export(
                module, (example,), str(path), input_names=inputs, output_names=outputs,
                dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                external_data=False,  # one self-contained file per network
            )  # fmt: skip
        paths[part] = path
    log.info("exported %s to %s", ", ".join(p.name for p in paths.values()), folder)
    return paths


def run(cfg: DictConfig) -> dict[str, Path]:
    return export(load_model(cfg), cfg.paths.output_dir, cfg.format)


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_or_report(run, cfg)


if __name__ == "__main__":
    main()
