"""Train a convolutional VAE: `python -m cvae.train [group=option] [key=value ...]`.

Run with `--help` for the config groups, `--cfg job` for the composed config.
"""

from __future__ import annotations

import warnings

import hydra
from omegaconf import DictConfig

from cvae.runtime import run_or_report, train

# Lightning 2.6 calls a torch API that torch deprecates, once per fit; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_or_report(train, cfg).get("val/loss")


if __name__ == "__main__":
    main()
