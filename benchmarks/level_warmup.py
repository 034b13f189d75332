"""What a KL warm-up per level does to a hierarchy: its bound and each level's use.

    python benchmarks/level_warmup.py [--steps 3000] [--warmup 1500] [--images 1000] \
        [--out outputs/benchmarks/level_warmup] [hydra overrides ...]
        # default overrides: experiment=quickstart model=hvae

Trains the model the overrides compose three times with `python -m cvae.train`, for the same
number of steps (a warm-up does not change a step's cost, so equal steps are equal time):
`model.level_warmup_steps` off, every level warmed up over `--warmup` steps (the Ladder VAE's
warm-up), and only the levels below the top warmed up; then `python -m cvae.evaluate` scores
each final checkpoint on the first `--images` validation images (K=100). Prints, per variant,
the IW NLL and negative ELBO (nats per image) and each level's KL and active units, top
first: a collapsed level has no active units. docs/models.md ("Stability") quotes it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import compose_train, machine


def _run(module: str, arguments: list[str]) -> None:
    """One entry point as a user runs it; its output is shown only if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", module, *arguments], capture_output=True, text=True
    )
    if done.returncode != 0:
        sys.exit(f"python -m {module} {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")


def _override(steps: list[int]) -> str:
    """A list as a Hydra override value: no spaces, so it stays one command-line word."""
    return f"[{','.join(map(str, steps))}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=1500, help="steps of each warm-up")
    parser.add_argument("--images", type=int, default=1000, help="validation images scored")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/level_warmup"))
    parser.add_argument("overrides", nargs="*", default=["experiment=quickstart", "model=hvae"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        levels = len(compose_train(Path(scratch), args.overrides).model.levels) + 1
    variants = {
        "off": "null",
        "every level": _override([args.warmup] * levels),
        "below the top": _override([0] + [args.warmup] * (levels - 1)),
    }
    runs = {name: args.out / name.replace(" ", "_") for name in variants}
    if earlier := [str(run) for run in runs.values() if run.exists()]:
        sys.exit(f"--out {args.out}: holds earlier runs ({', '.join(earlier)}); choose another")
    print(f"{machine()}; {' '.join(args.overrides)}; {args.steps} steps each")
    print("| warm-up | IW NLL (K=100) | -ELBO | KL per level | active units per level | min |")
    print("|---|---|---|---|---|---|")
    for name, steps in variants.items():
        started = time.perf_counter()
        run = runs[name]
        _run(
            "cvae.train",
            [
                *args.overrides,
                f"model.level_warmup_steps={steps}",
                f"trainer.max_steps={args.steps}",
                "trainer.max_time=null",
                "sampler=prior",
                "test=false",
                f"hydra.run.dir={run}",
            ],
        )
        _run(
            "cvae.evaluate",
            [
                f"ckpt_path={run}/checkpoints/last.ckpt",
                "eval.split=val",
                "eval.iw_samples=100",
                f"eval.max_images={args.images}",
                "eval.progress=false",
                f"hydra.run.dir={run}/eval",
            ],
        )
        (metrics_file,) = (run / "eval").glob("*/metrics.json")
        metrics = json.loads(metrics_file.read_text())
        kls = " / ".join(f"{kl:.1f}" for kl in metrics["kl_per_level"])
        units = " / ".join(str(n) for n in metrics["active_units_per_level"])
        minutes = (time.perf_counter() - started) / 60
        print(
            f"| {name} | {metrics['iw_nll']:.2f} | {metrics['neg_elbo']:.2f} | {kls} "
            f"| {units} | {minutes:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
