"""A conditional model's classes: the one place that turns labels (names in any case, the
folder names `cvae.generate` writes, indices, tensors) into class indices.

`cvae.generate` writes a class's images to `folder_name(name)` ("T-shirt/top" ->
"T-shirt-top": a file name holds no "/"), so a name matches a class when it equals the class
name or its folder name, ignoring case. Data, generation and evaluation all look names up
here, so a folder of classes in any order and any subset is read under the right labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def folder_name(name: str) -> str:
    """The folder of a class's images: its name without "/" ("T-shirt/top" -> "T-shirt-top")."""
    return name.replace("/", "-")


def _lookup_key(name: str) -> str:
    return folder_name(name).lower()


class ClassVocabulary:
    """The class names of a model, in index order (label `i` is `names[i]`)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = [str(name) for name in names]
        self._index = {_lookup_key(name): i for i, name in enumerate(self.names)}

    def __len__(self) -> int:
        return len(self.names)

    def index(self, label: int | str, key: str = "labels") -> int:
        """The index of one label (a name, a folder name or an index), or a one-line error
        naming `key`."""
        if isinstance(label, str) and not label.lstrip("-").isdigit():
            if _lookup_key(label) not in self._index:
                raise ValueError(
                    f"{key}={label!r} is not a class of this model: {', '.join(self.names)}"
                )
            return self._index[_lookup_key(label)]
        index = int(label)
        self.check_range(torch.tensor([index]), key)
        return index

    def indices(
        self,
        labels: int | str | Sequence[int | str] | torch.Tensor,
        count: int | None = None,
        key: str = "labels",
    ) -> torch.Tensor:
        """`labels` as a `(count,)` tensor of indices on the labels' device (CPU for names):
        one label for all `count` images, or one per image."""
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
            indices = labels.long().reshape(-1)
            if indices.device.type == "cpu":  # checked where it costs no device sync
                self.check_range(indices, key)
        else:
            single = isinstance(labels, (int, str)) or (
                isinstance(labels, torch.Tensor) and labels.ndim == 0
            )
            items = [labels] if single else list(labels)
            indices = torch.tensor([self.index(item, key) for item in items], dtype=torch.long)
        if count is not None and len(indices) == 1:
            indices = indices.expand(count)
        if count is not None and len(indices) != count:
            raise ValueError(f"{key} has {len(indices)} labels for {count} images")
        return indices

    def check_range(self, indices: torch.Tensor, key: str = "labels") -> None:
        """A one-line error naming `key` when an index is not one of these classes."""
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
            raise ValueError(
                f"{key}={bad} is not a class index of this model: 0 to "
                f"{len(self) - 1} ({', '.join(self.names)})"
            )

    def translation(self, names: Sequence[str], where: str) -> torch.Tensor:
        """`table[i]`: this vocabulary's index of `names[i]` (another source's classes, e.g. a
        folder's subfolders in their own order). Every unknown name in one line, naming
        `where` they come from, before any work is done."""
        unknown = [name for name in names if _lookup_key(name) not in self._index]
        if unknown:
            listed = ", ".join(repr(name) for name in unknown)
            raise ValueError(
                f"{where} has classes the checkpoint's model does not know: "
                f"{listed} (its classes: {', '.join(self.names)})"
            )
        return torch.tensor([self._index[_lookup_key(name)] for name in names], dtype=torch.long)
