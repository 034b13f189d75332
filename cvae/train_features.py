"""Train the feature network for in-domain FID: `python -m cvae.train_features [data=...]`.

A small classifier of the data's classes (training split), saved as TorchScript for
`cvae.evaluate eval.fid=true eval.fid_features=PATH` (see `cvae.features`, and
`conf/train_features.yaml` for every key). Output: outputs/features/<date>_<time>/.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cvae.errors import composed, run_door, run_or_report
from cvae.quiet import quiet_known_noise


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_features")
def main(cfg: DictConfig) -> None:
    composed()  # from here Hydra reports errors its own way
    quiet_known_noise()
    from cvae.features import run  # imports torch: after --help, after Hydra's checks

    run_or_report(run, cfg)


if __name__ == "__main__":
    run_door(main, "train_features")  # a mistyped key: one line with its close matches
