"""The exploration notebook runs headless against a checkpoint trained here."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

from cvae import ImageDataModule

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_checkpoint.ipynb"


def test_explore_checkpoint_notebook_runs(trained_run: Path) -> None:
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first_code.source.startswith("# Path to a checkpoint")
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    first_code.source = f"CKPT_PATH = {str(checkpoint)!r}"
    NotebookClient(
        notebook, timeout=300, kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()  # fmt: skip
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    # a batch, reconstructions, samples at two temperatures, two interpolations, a traversal,
    # the posterior means in 2-D and the training curves
    assert len(figures) == 9
    datamodule = ImageDataModule.load_from_checkpoint(checkpoint)
    datamodule.setup("test")
    batch = min(datamodule.hparams.batch_size, len(datamodule.test_set))
    text = "".join(out.get("text", "") for out in outputs)
    assert f"batch: ({batch}, 3, 16, 16)" in text
    assert "highest-KL dimensions:" in text and "active units:" in text
