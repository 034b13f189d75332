"""The random generators' states as plain values, so a resumed run draws what the first one
would have drawn next: saved in every checkpoint (the model's `on_save_checkpoint`) and set
again when training resumes."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def capture_rng_states() -> dict[str, Any]:
    """Python's, NumPy's and torch's (CPU and CUDA) generator states, as plain values and
    tensors: loadable with `torch.load(weights_only=True)`, as Lightning loads checkpoints."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), int(position), int(has_gauss), cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set every generator to the states `capture_rng_states` returned."""
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy(), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
