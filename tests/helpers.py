"""What several test modules share: tiny configs and the commands' configs, generated image
folders, running the real entry points, TensorBoard tags, a small feature network, the
notebook runner and the documentation pages. Test modules import these from here, never
from each other; `conftest.py` holds the fixtures."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import nbformat
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from nbclient import NotebookClient
from omegaconf import DictConfig
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.plugin_event_accumulator import (
    EventAccumulator as PluginEventAccumulator,
)
from torch import nn

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").rglob("*.md"))]

# Small and fast: 16x16 synthetic shapes, a two-block model, one epoch, no progress bar.
TINY = [
    "data=synthetic",
    "data.image_size=16",
    "data.synthetic_images=64",
    "data.batch_size=16",
    "data.num_workers=0",
    "model.latent_dim=8",
    "model.hidden_channels=[8,16]",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "+trainer.enable_progress_bar=false",
    "+trainer.enable_model_summary=false",
    "~callbacks.rich_progress_bar",
]


# `cvae.train_features` with a narrow network for one epoch at 16 px: a second.
TINY_CLASSIFIER = [
    "data.image_size=16",
    "data.batch_size=16",
    "data.num_workers=0",
    "classifier.epochs=1",
    "classifier.input_size=16",
    "classifier.width=8",
    "classifier.feature_dim=16",
    "progress=false",
]


# 52 training images in batches of 8: 7 steps an epoch, a step checkpoint every 2 steps.
LONG_RUN = [
    "data.synthetic_images=64",
    "data.batch_size=8",
    "trainer.max_epochs=2",
    "callbacks.step_checkpoint.every_n_train_steps=2",
    "trainer.deterministic=true",
    "test=false",
    "~callbacks.image_logger",
]


def compose_config(output_dir: Path, *overrides: str) -> DictConfig:
    """The training config as `python -m cvae.train` composes it, writing into `output_dir`."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])


def compose_train(output_dir: Path, *overrides: str) -> DictConfig:
    """The same with the tiny settings: seconds per run."""
    return compose_config(output_dir, *TINY, *overrides)


def compose_tool(name: str, output_dir: Path, *overrides: str) -> DictConfig:
    """The config of `python -m cvae.<evaluate|generate|export>` (config `eval`, ...)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(name, overrides=[f"paths.output_dir={output_dir}", *overrides])


def write_mixed_images(folder: Path, count: int = 6, seed: int = 0) -> list[Path]:
    """JPEG and PNG files of assorted modes and sizes: what a real folder looks like."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    kinds = [
        ("RGB", "jpg"),
        ("L", "png"),
        ("RGBA", "png"),
        ("P", "png"),
        ("CMYK", "JPEG"),
        ("RGB", "PNG"),
    ]
    paths = []
    for i in range(count):
        mode, ext = kinds[i % len(kinds)]
        width, height = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(array, "RGB")
        image = image.quantize(16) if mode == "P" else image.convert(mode)
        path = folder / f"image_{i}.{ext}"
        image.save(path)
        paths.append(path)
    return paths


def _png_claiming_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose header claims `width` x `height`: a decompression bomb."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    header = b"IHDR" + width.to_bytes(4, "big") + height.to_bytes(4, "big") + data[24:29]
    data[12:29] = header
    data[29:33] = zlib.crc32(header).to_bytes(4, "big")
    return bytes(data)


def write_broken_files(folder: Path) -> dict[str, Path]:
    """One file of each kind that a real folder holds and no decoder can read."""
    folder.mkdir(parents=True, exist_ok=True)
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(
        good, "JPEG"
    )
    files = {
        "zero_bytes": folder / "empty.jpg",
        "truncated": folder / "truncated.jpg",
        "not_an_image": folder / "notes.png",
        "decompression_bomb": folder / "bomb.png",
        "unreadable": folder / "dangling.jpg",
    }
    files["zero_bytes"].write_bytes(b"")
    files["truncated"].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    files["not_an_image"].write_text("a text file named like an image")
    files["decompression_bomb"].write_bytes(_png_claiming_size(30_000, 30_000))
    files["unreadable"].symlink_to(folder / "no_such_file.jpg")
    return files


def _interruptible() -> None:
    """Ctrl-C reaches the child as in a terminal, even when the tests run in a background job
    (whose shell set SIGINT to ignored, which children inherit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli(
    *overrides: str, multirun: bool = False, check: bool = True
) -> subprocess.CompletedProcess:
    """`python -m cvae.train` with the tiny settings, as a user would run it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "cvae.train", *(["-m"] if multirun else []), *TINY, *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_interruptible,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def event_tags(run_dir: Path) -> dict[str, list[str]]:
    tags: dict[str, set[str]] = {
        "scalars": set(),
        "images": set(),
        "histograms": set(),
        "hparams": set(),
    }
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for kind in ("scalars", "images", "histograms"):
            tags[kind].update(accumulator.Tags()[kind])
        plugins = PluginEventAccumulator(str(events))  # the one that reads plugin data
        plugins.Reload()
        if "hparams" in plugins.ActivePlugins():
            tags["hparams"].update(plugins.PluginTagToContent("hparams"))
    return {kind: sorted(names) for kind, names in tags.items()}


def load_checkpoint(path: Path) -> dict:
    """A checkpoint file's dict, as `weights_only` torch reads it."""
    return torch.load(path, map_location="cpu", weights_only=True)


def same_weights(a: dict, b: dict) -> bool:
    return all(
        torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6)
        for k, v in a["state_dict"].items()
    )


class TinyFeatures(nn.Module):
    """A fixed random convolution and pooling: 32 features of images of any channels, under
    the feature network contract (float32 in [0, 1])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1
        h = torch.relu(self.conv(images.mean(1, keepdim=True)))
        return 10 * nn.functional.adaptive_avg_pool2d(h, 2).flatten(1)


NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_checkpoint.ipynb"


def run_notebook(checkpoint: Path | None, folder: Path = NOTEBOOK.parent, cells: int | None = None):
    """Execute the notebook (its first `cells` cells) with `CKPT_PATH` set; its outputs."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    assert first_code.source.startswith("# Path to a checkpoint")
    first_code.source = f"CKPT_PATH = {str(checkpoint) if checkpoint else None!r}"
    notebook.cells = notebook.cells[:cells]
    NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(folder)}},
    ).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    return outputs


def figures(outputs: list) -> list:
    return [out for out in outputs if "image/png" in out.get("data", {})]


def text(outputs: list) -> str:
    return "".join(out.get("text", "") for out in outputs)


def page_name(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def run_without_cvae(script: str, folder: Path, **arrays: torch.Tensor) -> None:
    """Save `arrays` in `folder` as `<name>.npy` and run `script` (given the folder as its
    argument) in a fresh Python that never imports cvae: how a user loads an export."""
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array.numpy())
    command = [sys.executable, "-c", script, str(folder)]
    subprocess.run(command, check=True, cwd=folder, timeout=300)


SAMPLE_WITHOUT_CVAE = """
import sys
sys.modules["cvae"] = None  # importing cvae fails: the file must stand alone
import numpy as np, torch
folder = sys.argv[1]
decoder = torch.jit.load(f"{folder}/ts/decoder.pt")
z, eps = np.load(f"{folder}/z.npy"), np.load(f"{folder}/eps.npy")
images = decoder(torch.from_numpy(z), torch.from_numpy(eps))
np.save(f"{folder}/images.npy", images.detach().numpy())
"""


def exported_samples(model: nn.Module, folder: Path, z: torch.Tensor, eps: torch.Tensor):
    """The images a hierarchy's exported sampling graph (TorchScript) gives for top-level
    latents `z` and the lower levels' noise `eps`, loaded and run without cvae."""
    from cvae.exporting import export

    export(model, folder / "ts", "torchscript")
    run_without_cvae(SAMPLE_WITHOUT_CVAE, folder, z=z, eps=eps)
    return torch.from_numpy(np.load(folder / "images.npy"))


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`: the same draws on every call."""
    return torch.Generator().manual_seed(seed)


def brute_force_log_likelihood(model: nn.Module, x: torch.Tensor, step: float = 0.04):
    """log p(x) of a hierarchy with one latent on each of two levels, the integral of
    p(x | z_0, z_1) p(z_1 | z_0) p(z_0) over a grid of (z_0, z_1) in [-8, 8]^2: what its
    importance-weighted estimate must approach."""
    import math

    from cvae.models.losses import normal_log_density

    axis = torch.arange(-8, 8 + step / 2, step)
    grid = torch.cartesian_prod(axis, axis)  # (z_0, z_1)
    with torch.no_grad():
        logits, _, _, priors = model.top_down.walk(
            model.decoder, lambda v: v, None, grid[:, :1], lambda i, q, p: grid[:, 1:]
        )
        log_prior = normal_log_density(grid[:, :1]) + normal_log_density(
            grid[:, 1:], priors[0].mu, priors[0].log_var
        )
        log_px = torch.stack([model.likelihood(logits, image) for image in x], dim=1)
        return torch.logsumexp(log_px + log_prior[:, None], dim=0) + 2 * math.log(step)
