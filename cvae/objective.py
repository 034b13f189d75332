"""What a sweep ranks its runs by: a metric that means the same in every job.

`val/loss` is recon + beta * KL at each job's own beta, so a smaller beta lowers it by
construction; `objective.metric` (default `val/neg_elbo`, the negative ELBO at beta = 1) is
what `cvae.train` returns to the sweeper, what the sweep summary sorts by and what Optuna
optimises. Several metrics (a list) make a multi-objective search (Optuna's Pareto front).

Light on purpose (no torch): the sweep's Hydra callback checks the objective before the
first job starts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from omegaconf import DictConfig, ListConfig

# Validation metrics every training run logs, and what each is.
LOGGED = {
    "val/neg_elbo": "negative ELBO at beta = 1, nats per image",
    "val/bits_per_dim": "val/neg_elbo in bits per pixel value (comparable across image sizes)",
    "val/mse": "squared error per pixel of the reconstructions",
    "val/recon": "distortion: -log p(x | z), nats per image",
    "val/kl": "rate: KL(q(z | x) || p(z)), nats per image",
    "val/loss": "recon + beta * KL at the run's own beta (not comparable across beta)",
}
# Logged only by an optional callback: the metric, the callback and the setting it needs.
LOGGED_BY_CALLBACK = {
    "val/active_units": ("latent_monitor", None),
    "val/iw_nll": ("likelihood_monitor", "every_n_epochs"),
}
DIRECTIONS = ("minimize", "maximize")


@dataclass(frozen=True)
class Objective:
    """The checked `objective` config: metrics and their directions, one each."""

    metrics: tuple[str, ...]
    directions: tuple[str, ...]

    def values(self, metrics: Mapping[str, float]) -> float | tuple[float, ...] | None:
        """What the sweeper gets: the metric's value (a tuple for several), None when a
        metric was not logged (a run stopped before its first validation)."""
        if any(name not in metrics for name in self.metrics):
            return None
        found = tuple(float(metrics[name]) for name in self.metrics)
        return found[0] if len(found) == 1 else found


def rank_key(value: float | None, direction: str) -> tuple[int, float]:
    """How a run with objective `value` sorts among others (lower first): by `value`,
    negated when it is maximised; a run without a finite value after every run that has one."""
    if value is None or not math.isfinite(value):
        return (1, math.inf)
    return (0, value if direction == "minimize" else -value)


def _as_tuple(value: object) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple, ListConfig)) else (value,)


def logged_metrics(callbacks: Mapping | None) -> list[str]:
    """The validation metrics a run with these `callbacks` logs."""
    names = list(LOGGED)
    for name, (callback, setting) in LOGGED_BY_CALLBACK.items():
        entry = (callbacks or {}).get(callback)
        if entry and (setting is None or (entry.get(setting) or 0) > 0):
            names.append(name)
    return names


def check_objective(cfg: DictConfig) -> Objective:
    """`cfg.objective`, checked against what this run logs: one line naming the key and
    listing the logged metrics when it names something else."""
    settings = cfg.get("objective") or {}
    metrics = tuple(str(m) for m in _as_tuple(settings.get("metric", "val/neg_elbo")))
    directions = tuple(str(d) for d in _as_tuple(settings.get("direction", "minimize")))
    logged = logged_metrics(cfg.get("callbacks"))
    for metric in metrics:
        if metric not in logged:
            hint = ""
            if metric in LOGGED_BY_CALLBACK:
                callback, setting = LOGGED_BY_CALLBACK[metric]
                needs = f"callbacks.{callback}" + (f".{setting} > 0" if setting else "")
                hint = f" (it needs {needs})"
            raise ValueError(
                f"objective.metric={metric!r} is not logged by this run{hint}: "
                f"one of {', '.join(logged)}"
            )
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ValueError(f"objective.direction={bad[0]!r} is not one of {', '.join(DIRECTIONS)}")
    if len(directions) != len(metrics):
        raise ValueError(
            f"objective.direction has {len(directions)} entries for {len(metrics)} "
            "objective.metric entries: give one per metric"
        )
    return Objective(metrics, directions)
