"""Export a checkpoint: `python -m cvae.export ckpt_path=PATH format=torchscript|onnx`.

Encoder and decoder files that load without cvae (see `cvae.exporting`), in
outputs/export/<date>_<time>/.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cvae.errors import composed, run_door, run_or_report
from cvae.quiet import quiet_known_noise


@hydra.main(version_base="1.3", config_path="../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    composed()  # from here Hydra reports errors its own way
    quiet_known_noise()
    from cvae.exporting import run  # imports torch: after --help, after Hydra's checks

    run_or_report(run, cfg)


if __name__ == "__main__":
    run_door(main, "export")  # a mistyped key: one line with its close matches
