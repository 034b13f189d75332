"""Decode every image once into a memory-mapped uint8 `.npy` file, then read only that.

A cache entry is `<stem>.npy` (images, `(N, C, S, S)`) plus `<stem>.json` (what was
decoded and what was skipped). The stem holds a hash of the source's fingerprint and the
preprocessing settings, so a changed folder or setting gets a new entry and an unchanged
one is never decoded again. The array is written to a `.partial` file that is renamed
once complete, and the manifest is written last: a killed build leaves nothing that a
later run would read. A source with no usable item keeps no entry, and the cache folder
is removed again if the build made it: a mistyped or empty data folder gets nothing added.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from cvae.data.decode import ImageDecodeError, Preprocess
from cvae.data.presets import ImageSource
from cvae.errors import human_size

log = logging.getLogger(__name__)

# Bump when decoding changes what pixels a file gives: old entries are then ignored.
# 2: float TIFFs scaled from [0, 1], out-of-range float and 32-bit TIFFs skipped.
CACHE_FORMAT = 2
CHUNK = 256  # images per decode task: large enough to amortise scheduling


@dataclass
class Decoded:
    """A source after decoding: the pixels (None for a scan), which items are usable and
    which were skipped, with the reason."""

    images: np.ndarray | None
    valid: np.ndarray
    skipped: list[tuple[str, str]]


def cache_stem(source: ImageSource, preprocess: Preprocess) -> str:
    """`<kind>-<S>px-<C>ch-<hash>`: readable, and different whenever the pixels would be."""
    settings = dataclasses.asdict(preprocess)
    payload = json.dumps([CACHE_FORMAT, settings, source.fingerprint()], sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return f"{source.kind}-{preprocess.image_size}px-{preprocess.channels}ch-{digest}"


def _make_folder(folder: Path) -> list[Path]:
    """Create `folder` with its parents; return those that did not exist, innermost first."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"data.cache_dir={folder} cannot be created: {error}") from error
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` that are empty, innermost first (a folder that holds
    anything, another process's entry included, stays)."""
    for folder in sorted(set(folders), key=lambda path: len(path.parts), reverse=True):
        with suppress(OSError):
            folder.rmdir()


@contextmanager
def _locked(path: Path, created: list[Path]) -> Iterator[None]:
    """One builder per entry: a second process waits, then finds the entry complete.

    A build that keeps nothing removes its lock file and the folders it made: a process
    that waited on the removed file takes the lock again on a fresh one (adding to
    `created` the folders it made in turn).
    """
    while True:
        created.extend(_make_folder(path.parent))
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:  # the folder was removed in between: make it again
            continue
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            if _is_open(descriptor, path):
                yield
                return
        finally:
            os.close(descriptor)  # which releases the lock


def _is_open(descriptor: int, path: Path) -> bool:
    """Whether `path` still names the file open as `descriptor`."""
    try:
        return os.path.samestat(os.fstat(descriptor), os.stat(path))
    except FileNotFoundError:
        return False


def _read_entry(array_path: Path, manifest_path: Path, expected: tuple[int, ...]) -> Decoded | None:
    """The entry if it is complete and matches, else None (it will be rebuilt)."""
    try:
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete") or tuple(manifest["shape"]) != expected:
            return None
        images = None
        if manifest["with_images"]:
            images = np.load(array_path, mmap_mode="r")
            if images.shape != expected or images.dtype != np.uint8:
                return None
        skipped = [tuple(item) for item in manifest["skipped"]]
        return Decoded(images, np.asarray(manifest["valid"], dtype=np.int64), skipped)
    except (OSError, ValueError, KeyError, TypeError):  # missing, truncated or foreign files
        return None


def _decode_all(
    source: ImageSource, preprocess: Preprocess, out: Path | None, workers: int
) -> list[tuple[int, str]]:
    """Decode every item on `workers` threads, writing the pixels into the `.npy` file
    `out` if given; return the failures (index, reason).

    Threads suffice: Pillow releases the GIL while it decodes and resizes, and each chunk
    goes to the file in one `pwrite`, which releases it too (page faults on a fresh memory
    map would not).
    """
    item_bytes = int(np.prod(preprocess.shape))
    header = 0
    if out is not None:
        array = np.lib.format.open_memmap(
            out, mode="w+", dtype=np.uint8, shape=(len(source), *preprocess.shape)
        )
        header = array.offset
        del array
    descriptor = os.open(out, os.O_WRONLY) if out is not None else None

    def decode_chunk(start: int) -> tuple[int, list[tuple[int, str]]]:
        stop = min(start + CHUNK, len(source))
        pixels = np.zeros((stop - start, *preprocess.shape), dtype=np.uint8)
        failures = []
        for index in range(start, stop):
            try:
                pixels[index - start] = source.decode(index, preprocess)
            except ImageDecodeError as error:
                failures.append((index, str(error.__cause__ or error)))
        if descriptor is not None:
            os.pwrite(descriptor, pixels.data, header + start * item_bytes)
        return stop - start, failures

    failures: list[tuple[int, str]] = []
    console = Console(stderr=True)
    try:
        with (
            ThreadPoolExecutor(max(1, workers)) as pool,
            Progress(console=console, disable=not console.is_terminal) as progress,
        ):
            task = progress.add_task(f"Decoding {source.name}", total=len(source))
            for done, chunk_failures in pool.map(decode_chunk, range(0, len(source), CHUNK)):
                failures.extend(chunk_failures)
                progress.advance(task, done)
    finally:
        if descriptor is not None:
            os.close(descriptor)
    return sorted(failures)


def decode_source(
    source: ImageSource,
    preprocess: Preprocess,
    cache_dir: str | os.PathLike,
    workers: int,
    with_images: bool = True,
) -> Decoded:
    """Decode `source` once into `cache_dir` (or reuse the entry there) and map it.

    Without `with_images` only the list of usable items is kept: the scan that lets the
    decode-per-epoch path skip broken files too. A source with no usable item is returned
    (images None, every item skipped) without keeping anything on disk: the caller reports
    it as an error.
    """
    cache_dir = Path(cache_dir)
    created = _make_folder(cache_dir)
    if not os.access(cache_dir, os.W_OK):
        _remove_empty(created)
        raise PermissionError(f"data.cache_dir={cache_dir} is not writable")
    stem = cache_stem(source, preprocess) + ("" if with_images else "-scan")
    array_path, manifest_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"
    shape = (len(source), *preprocess.shape)
    lock = cache_dir / f"{stem}.lock"
    with _locked(lock, created):
        entry = _read_entry(array_path, manifest_path, shape)
        if entry is not None:
            return entry
        for stale in (array_path, manifest_path, *cache_dir.glob(f"{stem}.*.partial")):
            stale.unlink(missing_ok=True)
        partial = cache_dir / f"{stem}.{os.getpid()}.partial"

        def discard() -> None:
            """Remove what this build made: its files, its lock, the folders made for it."""
            partial.unlink(missing_ok=True)
            manifest_path.with_suffix(".json.partial").unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            _remove_empty(created)

        try:
            skipped = _build(
                source, preprocess, partial, array_path, manifest_path, workers, with_images
            )
        except OSError as error:
            discard()
            if isinstance(error, ImageDecodeError):
                raise
            needed = int(np.prod(shape)) if with_images else 0
            raise OSError(_build_failure(cache_dir, needed, error)) from error
        if skipped is not None:  # nothing usable: nothing kept
            discard()
            return Decoded(None, np.zeros(0, dtype=np.int64), skipped)
        entry = _read_entry(array_path, manifest_path, shape)
    if entry is None:
        raise OSError(f"cache entry {manifest_path} was written but cannot be read back")
    return entry


def _build_failure(cache_dir: Path, needed: int, error: OSError) -> str:
    """One line for a cache that could not be written: where, and how much space it needs."""
    free = shutil.disk_usage(cache_dir).free
    if error.errno == errno.ENOSPC or needed > free:
        what = f"no space left ({human_size(needed)} needed, {human_size(free)} free)"
    else:
        what = error.strerror or str(error)
    return (
        f"cannot build the decoded-image cache in data.cache_dir={cache_dir}: {what}; "
        "free some space or set data.cache_dir to another folder"
    )


def _build(
    source: ImageSource,
    preprocess: Preprocess,
    partial: Path,
    array_path: Path,
    manifest_path: Path,
    workers: int,
    with_images: bool,
) -> list[tuple[str, str]] | None:
    """Decode into `partial`, rename it into place, then write the manifest (last, so that
    an entry with a manifest is complete). When no item decodes, write nothing and return
    the skipped items (item, reason) instead: an entry no run can use is not kept."""
    if with_images:
        needed = len(source) * int(np.prod(preprocess.shape))
        if needed > shutil.disk_usage(partial.parent).free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial.parent))
    started = time.perf_counter()
    failures = _decode_all(source, preprocess, partial if with_images else None, workers)
    skipped = [(source.item_name(i), reason) for i, reason in failures]
    if len(failures) == len(source):
        return skipped
    if with_images:
        os.replace(partial, array_path)
    bad = {index for index, _ in failures}
    manifest = {
        "complete": True,
        "with_images": with_images,
        "shape": [len(source), *preprocess.shape],
        "source": source.name,
        "preprocess": dataclasses.asdict(preprocess),
        "valid": [i for i in range(len(source)) if i not in bad],
        "skipped": skipped,
    }
    temporary = manifest_path.with_suffix(".json.partial")
    temporary.write_text(json.dumps(manifest))
    os.replace(temporary, manifest_path)
    seconds = time.perf_counter() - started
    log.info(
        "decoded %d images from %s in %.1f s (%.0f files/s; %d skipped: not decodable) into %s",
        len(source) - len(failures),
        source.name,
        seconds,
        len(source) / max(seconds, 1e-9),
        len(failures),
        array_path if with_images else manifest_path,
    )
    return None
