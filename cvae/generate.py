"""Generate with a checkpoint: `python -m cvae.generate ckpt_path=PATH mode=...`.

`sample`, `reconstruct`, `interpolate` or `traverse` (see `cvae.generation`, and
`conf/generate.yaml` for every key). Output: outputs/generate/<date>_<time>/.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cvae.errors import composed, run_door, run_or_report
from cvae.quiet import quiet_known_noise


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    composed()  # from here Hydra reports errors its own way
    quiet_known_noise()
    from cvae.generation import generate  # imports torch: after --help, after Hydra's checks

    run_or_report(generate, cfg)


if __name__ == "__main__":
    run_door(main, "generate")  # a mistyped key: one line with its close matches
