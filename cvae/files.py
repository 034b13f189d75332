"""Files written whole or not at all, their digests, and one line for a torch file that
cannot be read.

Every file cvae writes that another command reads back (checkpoints, sampler fits,
evaluation chunks, CSV and JSON results) goes through `atomic_write`: a temporary file with
a name of its own beside the target, renamed over it when complete and removed on any other
exit, so two processes writing one target never share a temporary file and a stopped write
leaves nothing behind. Light on purpose: no torch import.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in blocks (checkpoints are tens of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _default_mode() -> int:
    """The permissions `open()` would give a new file under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", sync: bool = False) -> Iterator[IO]:
    """A handle to write `path` through: the bytes go to a uniquely named temporary file in
    the same folder, renamed over `path` when the block ends normally (`sync`: forced to
    disk first), removed when it ends any other way (an error, Ctrl-C, a signal turned into
    an exception). The previous `path`, if any, stays whole until the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle_fd, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".partial", dir=path.parent
    )
    try:
        with os.fdopen(handle_fd, mode, **({} if "b" in mode else {"newline": ""})) as handle:
            yield handle
            handle.flush()
            if sync:
                os.fsync(handle.fileno())
        os.chmod(temporary, _default_mode())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def why_unreadable(path: str | os.PathLike, error: BaseException) -> str:
    """Why `torch.load` could not read a file, in words, judged by how the file starts:
    torch writes zip archives (older versions a pickle stream). A file holding Python
    objects is refused by `weights_only` and never run: the line says so, and does not
    repeat torch's advice to load it unsafely."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty"
    if head != b"PK\x03\x04" and not head.startswith(b"\x80"):
        return "not a PyTorch file"
    if "Weights only load failed" in str(error):
        return "it holds Python objects that cvae never writes, not loaded for safety"
    return f"the file is damaged or truncated: {str(error).splitlines()[0]}"
