"""Walk an ImageFolder-style tree: flat folders and class subfolders alike."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Folders of images that a Debian package installs (a preset reads them in place), and how to
# get each: what the error says when a data.root inside one does not exist.
PACKAGED_FOLDERS = {
    Path("/usr/share/icons/oxygen"): (
        "install the icon theme with `make icons` (Debian package oxygen-icon-theme)"
    ),
}


@dataclass(frozen=True)
class FolderIndex:
    """Image files under a root, with the class index of each (-1 when not in a subfolder)."""

    root: Path
    files: list[Path]
    labels: list[int]
    classes: list[str]


def check_root(root: str | os.PathLike | None, key: str = "data.root") -> Path:
    """Fail early, naming the key and the path, when a data root is unusable."""
    if root is None or str(root) == "":
        raise ValueError(f"{key} is not set: point it at a folder of images")
    path = Path(root).expanduser()
    if not path.exists():
        hints = [hint for folder, hint in PACKAGED_FOLDERS.items() if path.is_relative_to(folder)]
        raise FileNotFoundError(f"{key}={path} does not exist" + "".join(f": {h}" for h in hints))
    if not path.is_dir():
        raise NotADirectoryError(f"{key}={path} is a file, not a folder of images")
    return path


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def index_folder(root: str | os.PathLike, key: str = "data.root") -> FolderIndex:
    """Find every image under `root`, recursively, following symlinks without looping.

    Files directly in `root` get label -1; files anywhere below a first-level subfolder
    get that subfolder's index among the sorted subfolder names holding images. A dangling
    link named like an image is listed, so that decoding reports it instead of losing it.
    `key` is what errors call the root: the setting the user typed.
    """
    root = check_root(root, key)
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    found: list[tuple[Path, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink back into the tree: walked already
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        relative = Path(dirpath).relative_to(root)
        top = relative.parts[0] if relative.parts else None
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _is_hidden(name) or path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            # Only links need resolving: a plain file's real path is its folder's plus its name.
            real_file = os.path.realpath(path) if path.is_symlink() else os.path.join(real, name)
            if real_file in seen_files or (
                os.path.exists(real_file) and not os.path.isfile(real_file)
            ):
                continue
            seen_files.add(real_file)
            found.append((path, top))
    if not found:
        extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"{key}={root} holds no image files ({extensions})")
    classes = sorted({top for _, top in found if top is not None})
    class_index = {name: i for i, name in enumerate(classes)}
    files = [path for path, _ in found]
    labels = [class_index[top] if top is not None else -1 for _, top in found]
    return FolderIndex(root=root, files=files, labels=labels, classes=classes)
