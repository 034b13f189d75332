"""Exported encoder and decoder load without cvae and match the eager model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cvae import CVAE
from cvae.exporting import export
from cvae.exporting import run as export_command
from tests.helpers import compose_tool, run_without_cvae

# Runs in a fresh interpreter where importing cvae fails: the files must stand alone.
LOAD_WITHOUT_CVAE = """
import sys
sys.modules["cvae"] = None
import numpy as np, onnxruntime, torch
folder = sys.argv[1]
images, z = np.load(f"{folder}/images.npy"), np.load(f"{folder}/z.npy")
encoder = torch.jit.load(f"{folder}/ts/encoder.pt")
decoder = torch.jit.load(f"{folder}/ts/decoder.pt")
with torch.no_grad():
    mu, log_var = encoder(torch.from_numpy(images))
    np.save(f"{folder}/ts_mu.npy", mu.numpy()); np.save(f"{folder}/ts_log_var.npy", log_var.numpy())
    np.save(f"{folder}/ts_images.npy", decoder(torch.from_numpy(z)).numpy())
encoder = onnxruntime.InferenceSession(f"{folder}/onnx/encoder.onnx")
decoder = onnxruntime.InferenceSession(f"{folder}/onnx/decoder.onnx")
mu, log_var = encoder.run(["mu", "log_var"], {"images": images})
np.save(f"{folder}/onnx_mu.npy", mu); np.save(f"{folder}/onnx_log_var.npy", log_var)
np.save(f"{folder}/onnx_images.npy", decoder.run(["images"], {"z": z})[0])
"""


@pytest.mark.slow
def test_exports_load_without_cvae_and_match_the_eager_model(
    trained_run: Path, tmp_path: Path
) -> None:
    model = CVAE.load_from_checkpoint(trained_run / "checkpoints" / "last.ckpt").eval()
    export(model, tmp_path / "ts", "torchscript")
    export(model, tmp_path / "onnx", "onnx")
    images, z = torch.rand(5, 3, 16, 16), torch.randn(7, 8)  # batch sizes unlike the traces
    run_without_cvae(LOAD_WITHOUT_CVAE, tmp_path, images=images, z=z)
    with torch.no_grad():
        mu, log_var = model.encode(images).top
        decoded = model.decode(z)
    for fmt in ("ts", "onnx"):
        for name, expected in (("mu", mu), ("log_var", log_var), ("images", decoded)):
            actual = torch.from_numpy(np.load(tmp_path / f"{fmt}_{name}.npy"))
            torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_export_command_writes_into_the_output_folder(trained_run: Path, tmp_path) -> None:
    cfg = compose_tool("export", tmp_path, f"ckpt_path={trained_run}/checkpoints/last.ckpt")
    paths = export_command(cfg)
    assert sorted(p.name for p in paths.values()) == ["decoder.pt", "encoder.pt"]
    assert all(p.parent == tmp_path for p in paths.values())


def test_unknown_format_is_an_error(trained_run: Path, tmp_path: Path) -> None:
    cfg = compose_tool(
        "export", tmp_path, f"ckpt_path={trained_run}/checkpoints/last.ckpt", "format=tflite"
    )
    with pytest.raises(ValueError, match="format='tflite' is not one of torchscript, onnx"):
        export_command(cfg)
