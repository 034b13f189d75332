"""Images per second delivered to a training loop: torchvision's ImageFolder against
ImageDataModule building its decoded cache (cold) and reading it (warm).

    python benchmarks/data_throughput.py [--root DIR] [--num-images 20000] [--num-workers N]

Without `--root` it writes (once, then reuses) a folder of JPEGs of CelebA's size, 178x218,
under /tmp. Each measurement runs in a fresh process, so its peak memory is its own; all
three run in this invocation, and the ratios are against the baseline measured here.
Peak resident memory counts the baseline's loader workers too.
Each loop turns batches into float images in [0, 1] (the baseline's ToTensor does it in
its workers, cvae's model does it in the step), so all three deliver the same thing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TARGETS = {"cold": 1.5, "warm": 30.0}  # times the baseline, on the 2-core reference machine
WIDTH, HEIGHT = 178, 218  # CelebA's aligned faces


def write_faces(folder: Path, count: int, seed: int = 0) -> None:
    """Smooth random pictures with an ellipse: JPEGs of a realistic size (about 10 KB)."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)

    def write(index: int) -> None:
        rng = np.random.default_rng(seed * 1_000_003 + index)
        coarse = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        ImageDraw.Draw(image).ellipse((40, 50, 140, 180), fill=colour)
        image.filter(ImageFilter.GaussianBlur(1)).save(folder / f"{index:06d}.jpg", quality=95)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(write, range(count)))


def ensure_folder(root: Path | None, count: int) -> Path:
    if root is not None:
        return root
    root = Path(tempfile.gettempdir()) / f"cvae-bench-faces-{count}"
    images = root / "img_align_celeba"  # ImageFolder needs a class folder: CelebA's layout
    if not images.is_dir() or len(os.listdir(images)) != count:
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        write_faces(images, count)
        print(f"wrote {count} JPEGs to {images} in {time.perf_counter() - started:.0f} s")
    return root


def _mib(pid: int | str, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _memory() -> dict[str, float]:
    """Peak resident MiB of this process plus that of its live children (loader workers),
    and the anonymous (not file-backed) part of what this process holds now."""
    children = [
        int(pid)
        for task in Path("/proc/self/task").iterdir()
        for pid in (task / "children").read_text().split()
    ]
    workers = sum(_mib(pid, "VmHWM") for pid in children)
    return {"peak_mib": _mib("self", "VmHWM") + workers, "anon_mib": _mib("self", "RssAnon")}


def _epoch(loader) -> int:
    """One pass, as a training loop sees it: float images in [0, 1]."""
    from cvae import unit_range

    count = 0
    for images, _ in loader:
        count += len(unit_range(images))
    return count


def measure(phase: str, root: Path, cache_dir: Path, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if phase == "baseline":
        from torchvision import datasets, transforms

        transform = transforms.Compose(
            [
                transforms.Resize(args.image_size),
                transforms.CenterCrop(args.image_size),
                transforms.ToTensor(),
            ]
        )
        started = time.perf_counter()
        dataset = datasets.ImageFolder(str(root), transform=transform)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=args.num_workers,
            persistent_workers=args.num_workers > 0,  # alive at the end: their memory counts
        )
        count = _epoch(loader)
        return {"images": count, "seconds": time.perf_counter() - started, **_memory()}

    from cvae import ImageDataModule

    anon_before = _mib("self", "RssAnon")
    started = time.perf_counter()
    datamodule = ImageDataModule(
        root=str(root),
        image_size=args.image_size,
        batch_size=args.batch_size,
        val_fraction=0,
        test_fraction=0,
        cache_dir=str(cache_dir),
        cache_workers=args.num_workers,
        num_workers=args.num_workers,
    )
    datamodule.setup()
    setup = time.perf_counter() - started
    count = _epoch(datamodule.train_dataloader())
    seconds = time.perf_counter() - started
    result = {"images": count, "seconds": seconds, "setup_seconds": setup}
    if phase == "warm":  # later epochs: no setup at all
        started = time.perf_counter()
        epochs = 3
        for _ in range(epochs):
            _epoch(datamodule.train_dataloader())
        result["epoch_seconds"] = (time.perf_counter() - started) / epochs
    result["cache_mib"] = sum(p.stat().st_size for p in cache_dir.glob("*.npy")) / 2**20
    memory = _memory()
    return {**result, **memory, "anon_growth_mib": memory["anon_mib"] - anon_before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="an image folder (default: generated)")
    parser.add_argument("--num-images", type=int, default=20_000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    cores = len(os.sched_getaffinity(0))
    workers_help = "baseline loader workers and cvae decode threads (default: cores)"
    parser.add_argument("--num-workers", type=int, default=cores, help=workers_help)
    parser.add_argument("--threads", type=int, default=cores, help="torch threads")
    parser.add_argument("--phase", choices=["baseline", "cold", "warm"], help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.phase:  # a child process: measure one thing, print it as JSON
        print(json.dumps(measure(args.phase, args.root, args.cache_dir, args)))
        return

    root = ensure_folder(args.root, args.num_images)
    cache_dir = Path(tempfile.mkdtemp(prefix="cvae-bench-cache-"))
    print(
        f"machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
        f"python {platform.python_version()}; folder: {root}"
    )
    print(
        f"{args.num_workers} workers/threads, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size}\n"
    )
    results = {}
    try:
        for phase in ("baseline", "cold", "warm"):
            command = [
                sys.executable,
                __file__,
                "--phase",
                phase,
                "--root",
                str(root),
                "--cache-dir",
                str(cache_dir),
                "--image-size",
                str(args.image_size),
                "--batch-size",
                str(args.batch_size),
                "--threads",
                str(args.threads),
                "--num-workers",
                str(args.num_workers),
            ]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            results[phase] = json.loads(output.strip().splitlines()[-1])
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    base = results["baseline"]["images"] / results["baseline"]["seconds"]
    rates = {
        "baseline": base,
        "cold": results["cold"]["images"] / results["cold"]["seconds"],
        "warm": results["warm"]["images"] / results["warm"]["epoch_seconds"],
    }
    labels = {
        "baseline": "torchvision ImageFolder + DataLoader (one epoch)",
        "cold": "ImageDataModule, building its cache + one epoch",
        "warm": "ImageDataModule, reading its cache (epoch)",
    }
    print(f"{'':52} {'images/s':>9} {'x base':>7} {'peak RSS MiB':>13}")
    for phase, rate in rates.items():
        print(
            f"{labels[phase]:52} {rate:9.0f} {rate / base:6.1f}x {results[phase]['peak_mib']:13.0f}"
        )
    warm = results["warm"]
    with_setup = warm["images"] / warm["seconds"]
    print(
        f"\nwarm, including setup (walk, stat and hash of {warm['images']} files): "
        f"{with_setup:.0f} images/s = {with_setup / base:.1f}x baseline "
        f"(setup {warm['setup_seconds']:.2f} s)"
    )
    print(
        f"cache: {warm['cache_mib']:.0f} MiB on disk; reading it for 4 epochs grew the "
        f"process's anonymous memory by {warm['anon_growth_mib']:.0f} MiB (the pages read "
        "belong to the memory-mapped file, in the page cache)"
    )
    for phase, target in TARGETS.items():
        ratio = rates[phase] / base
        verdict = "meets" if ratio >= target else "MISSES"
        print(f"{phase}: {ratio:.1f}x the baseline, target >= {target}x: {verdict} it")


if __name__ == "__main__":
    main()
