"""Train a convolutional VAE: `python -m cvae.train [group=option] [key=value ...]`.

Run with `--help` for the config groups, `--cfg job` for the composed config.
"""

from __future__ import annotations

import sys
import warnings

import hydra
from omegaconf import DictConfig

from cvae.runtime import error_line, train, user_error

# Lightning 2.6 calls a torch API that torch deprecates, once per fit; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        print(f"error: {error_line(cause)}", file=sys.stderr)
        sys.exit(1)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
