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

from cvae.models import CVAE
from cvae.models.conditioning import LabelledDecoder, LabelledEncoder
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
    images = torch.rand(2, hp.in_channels, hp.image_size, hp.image_size)
    examples = {"encoder": (model.encoder, (images,)),
                "decoder": (model.decoder, (torch.randn(2, hp.latent_dim),))}  # fmt: skip
    names = {"encoder": (["images"], ["mu", "log_var"]), "decoder": (["z"], ["images"])}
    if model.conditional:  # the label is a second input of each network
        labels = torch.tensor([0, len(model.class_names) - 1])
        examples = {
            "encoder": (LabelledEncoder(model.encoder, model.conditioning).eval(),
                        (images, labels)),
            "decoder": (LabelledDecoder(model.decoder, model.conditioning).eval(),
                        (examples["decoder"][1][0], labels)),
        }  # fmt: skip
        names = {part: ([*inputs, "labels"], outputs) for part, (inputs, outputs) in names.items()}
    paths = {}
    for part, (module, example) in examples.items():
        path = folder / f"{part}{FORMATS[format]}"
        example = tuple(tensor.to(model.device) for tensor in example)
        if format == "torchscript":
            with torch.no_grad():
                torch.jit.trace(module, example).save(str(path))
        else:
            inputs, outputs = names[part]
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                module, example, str(path), input_names=inputs, output_names=outputs,
                dynamic_shapes=tuple({0: batch} for _ in example), dynamo=True,
                external_data=False,  # one self-contained file per network
                verbose=False,  # no step-by-step progress lines
            )  # fmt: skip
        paths[part] = path
    log.info("exported %s to %s", ", ".join(p.name for p in paths.values()), folder)
    return paths


def run(cfg: DictConfig) -> dict[str, Path]:
    return export(load_model(cfg), cfg.paths.output_dir, cfg.format)
