"""Evaluate a checkpoint: `python -m cvae.evaluate ckpt_path=PATH [data=...] [eval.iw_samples=K]`.

Prints per-image negative ELBO, importance-weighted NLL, bits/dim, PSNR, SSIM, active units
and more (FID and KID with `eval.fid=true`), and writes them to
outputs/eval/<checkpoint>-<split>-k<K>-<hash>/metrics.json. That folder keeps every finished
chunk of images: the same command run again after an interruption continues from there.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cvae.errors import composed, run_door, run_or_report
from cvae.quiet import quiet_known_noise


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    composed()  # from here Hydra reports errors its own way
    quiet_known_noise()
    # imports torch: after --help, after Hydra's checks
    from cvae.evaluation import evaluate_checkpoint

    run_or_report(evaluate_checkpoint, cfg)


if __name__ == "__main__":
    run_door(main, "eval")  # a mistyped key: one line with its close matches
