"""Train a convolutional VAE: `python -m cvae.train [group=option] [key=value ...]`.

Run with `--help` for the config groups, `--cfg job` for the composed config.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cvae.errors import composed, run_door, run_or_report
from cvae.objective import check_objective
from cvae.quiet import quiet_known_noise
from cvae.summary import kept_result, stopped_sweep


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | tuple[float, ...] | None:
    """Returns the sweep objective (`objective.metric`): what a sweeper ranks this run by."""
    composed()  # from here Hydra reports errors its own way
    quiet_known_noise()
    kept = kept_result(cfg)  # a sweep continued in its folder: a job it finished stays
    if kept is not None:
        return check_objective(cfg).values(kept)
    from cvae.training import train  # imports Lightning: after --help, after Hydra's checks

    with stopped_sweep(cfg):  # a sweep stopped by a signal: its summary and last line
        metrics = run_or_report(train, cfg)  # checks the objective before any work
    return check_objective(cfg).values(metrics)


if __name__ == "__main__":
    run_door(main, "train")  # a mistyped key: one line with its close matches
