"""Latent samplers: where the z of a new image comes from, once a model is trained.

A VAE's posteriors rarely fill its prior: N(0, I) draws land where no training image's
posterior lies, and decode to blobs. An ex-post sampler fits a density to where the
posteriors do lie and draws from that instead (Ghosh et al. 2020; Dai and Wipf 2019):
- `prior` (`PriorSampler`): the model's own prior (`model.prior`), nothing to fit;
- `gmm`: scikit-learn's `GaussianMixture` fitted to the posterior means of training images;
- `two_stage`: a small second VAE trained on latents drawn from the cached posteriors (in
  their top principal directions); its draws are decoded into the first model's latent space.

Each is an object Hydra instantiates from `conf/sampler/<name>.yaml` (`_target_`), once per
command. Samplers read the top latent level of a model's typed posterior
(`cvae.models.latents`); a model with lower levels completes them when it decodes.
`fit_and_save` fits one to a model's training images and saves it beside the checkpoint
(`<checkpoint stem>.<name>.pt`: its settings, the checkpoint's SHA-256 and plain tensors that
`torch.load(weights_only=True)` reads); `loaded_for(checkpoint)` reads that fit back with
the settings it was made with, so sampling later needs no data and no network, and a fit of
an older `last.ckpt` is refused. A conditional model gets one density per class. Every
sampler draws on the CPU with a `torch.Generator`: the same seed gives the same latents.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from cvae.files import atomic_write, sha256, why_unreadable
from cvae.models.latents import Posterior
from cvae.progress import ProgressReport, count_images

if TYPE_CHECKING:
    from cvae.models import CVAE

log = logging.getLogger(__name__)
COVARIANCES = ("full", "diag", "tied", "spherical")  # scikit-learn's covariance_type
EM_ITERATIONS = 100  # a mixture's EM iterations at most (scikit-learn's default)
EM_CHUNK = 5  # iterations per call between progress lines (each call adds one E-step)


class NoFit(ValueError):
    """No fit of a checkpoint as it is now: none beside it, or one of an older version."""


def sampler_path(checkpoint: str | Path, name: str) -> Path:
    """Where the fitted sampler `name` of `checkpoint` is kept: beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.{name}.pt")


def fit_command(checkpoint: str | Path, name: str) -> str:
    return f".venv/bin/python -m cvae.generate mode=fit sampler={name} ckpt_path={checkpoint}"


class LatentSampler:
    """Base of the samplers: `fit` on posteriors, `latents` for new images, `save`, and
    `loaded_for` a checkpoint.

    Fitted subclasses implement `_fit_one` (one density from `(mu, log_var)` rows) and
    `_sample_one` (latents from one fitted state); the base handles classes, files and the
    generator."""

    name = ""
    needs_fit = True  # False: nothing to fit or save (the prior)

    def __init__(self, seed: int = 0, max_images: int | None = None) -> None:
        if max_images is not None and (not isinstance(max_images, int) or max_images < 2):
            raise ValueError(
                f"sampler.max_images must be null or an integer >= 2, got {max_images!r}"
            )
        self.seed, self.max_images = int(seed), max_images
        self.states: dict[int, dict[str, torch.Tensor]] = {}  # class index (-1: all) -> state

    @property
    def fitted(self) -> bool:
        return bool(self.states) or not self.needs_fit

    @property
    def shared_across_classes(self) -> bool:
        """Whether its latents ignore the class (then a grid of classes shares them)."""
        return False

    def settings(self) -> dict:
        """The plain settings saved with the fit (what the file says it is)."""
        return {"seed": self.seed, "max_images": self.max_images}

    def describe(self) -> str:
        """`sampler=gmm (components=100, ...)`: for log lines."""
        settings = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"sampler={self.name}" + (f" ({settings})" if settings else "")

    # --- fitting -------------------------------------------------------------------------
    def fit(
        self, mu: torch.Tensor, log_var: torch.Tensor, labels: torch.Tensor | None = None
    ) -> LatentSampler:
        """Fit to posteriors `(mu, log_var)`, `(N, latent_dim)`; with `labels` (a conditional
        model's class indices) one density per class."""
        mu, log_var = mu.detach().double().cpu(), log_var.detach().double().cpu()
        groups = (
            {-1: torch.arange(len(mu))}
            if labels is None
            else {int(c): (labels == c).nonzero().flatten() for c in labels.unique()}
        )
        self.states = {}
        for index, rows in groups.items():
            if len(rows) < 2:
                raise ValueError(
                    f"sampler={self.name}: class {index} has {len(rows)} image(s); "
                    "a density needs at least 2"
                )
            self.states[index] = self._fit_one(mu[rows], log_var[rows])
        return self

    def _fit_one(self, mu: torch.Tensor, log_var: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- sampling ------------------------------------------------------------------------
    def latents(
        self,
        model: CVAE,
        n: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """`n` top-level latents `(n, latent_dim)` on the CPU for `model` (what
        `CVAE.sample` asks): a fitted sampler's `draw`."""
        return self.draw(n, generator, labels, temperature)

    def draw(
        self,
        n: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """`n` latents `(n, latent_dim)` from the fitted density, on the CPU; a conditional
        model's from the density of each row's class (`labels`, class indices), drawn class
        by class in index order."""
        if not self.states:
            raise ValueError(f"sampler={self.name} is not fitted (fit it, or load a fit)")
        if labels is None:
            if -1 not in self.states:
                raise ValueError(f"sampler={self.name} was fitted per class: give labels")
            return self._sample_one(self.states[-1], n, generator, temperature).float()
        labels = labels.cpu()
        out: torch.Tensor | None = None
        for index in labels.unique().tolist():
            if index not in self.states:
                raise ValueError(f"sampler={self.name} has no fit for class {index}")
            rows = (labels == index).nonzero().flatten()
            z = self._sample_one(self.states[index], len(rows), generator, temperature).float()
            out = torch.empty(n, z.shape[1]) if out is None else out
            out[rows] = z
        return out if out is not None else torch.empty(0, 0)

    def _sample_one(
        self,
        state: dict[str, torch.Tensor],
        n: int,
        generator: torch.Generator | None,
        temperature: float,
    ) -> torch.Tensor:
        raise NotImplementedError

    # --- files ---------------------------------------------------------------------------
    def save(self, checkpoint: str | Path) -> Path:
        """Write the fit, with its settings and the checkpoint's digest, beside
        `checkpoint` (whole or not at all: `files.atomic_write`)."""
        path = sampler_path(checkpoint, self.name)
        contents = {
            "sampler": self.name,
            "settings": self.settings(),
            "checkpoint_sha256": sha256(checkpoint),
            "states": {str(k): v for k, v in self.states.items()},
        }
        with atomic_write(path) as handle:
            torch.save(contents, handle)
        return path

    def loaded_for(self, checkpoint: str | Path) -> LatentSampler:
        """This kind of sampler as fitted to `checkpoint` and saved beside it, built with
        the settings it was fitted with (said when they differ from this one's: those are
        for fitting). A one-line error naming the file and the fit command when the file is
        not a fit, and `NoFit` when there is none or the checkpoint changed since (a
        `last.ckpt` trained on): what `fitted_for` fits afresh."""
        path = sampler_path(checkpoint, self.name)
        again = f"fit it again with: {fit_command(checkpoint, self.name)}"
        if not path.is_file():
            raise NoFit(
                f"sampler={self.name} is not fitted for {checkpoint} (no "
                f"{path.name} beside it): fit it with: "
                f"{fit_command(checkpoint, self.name)} (or draw from the "
                "model's prior: sampler=prior)"
            )
        try:
            contents = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{path} is not a sampler fit ({why_unreadable(path, error)}); {again}"
            ) from None
        if not isinstance(contents, dict) or not {"sampler", "states", "settings"} <= set(contents):
            raise ValueError(
                f"{path} is not a sampler fit (a torch file, but not one cvae wrote); {again}"
            )
        if contents["sampler"] != self.name:
            raise ValueError(f"{path} holds a {contents['sampler']} fit, not {self.name}; {again}")
        if contents.get("checkpoint_sha256") != sha256(checkpoint):
            raise NoFit(
                f"{path} was fitted to another version of {checkpoint} (it has "
                f"changed since): {again}"
            )
        try:
            loaded = type(self)(**contents["settings"])
            loaded.states = {int(k): dict(v) for k, v in contents["states"].items()}
            loaded.draw(1, torch.Generator(), _any_label(loaded.states))
        except Exception as error:
            raise ValueError(f"{path} is a damaged {self.name} fit ({error}); {again}") from None
        differ = {k: v for k, v in self.settings().items() if loaded.settings().get(k) != v}
        if differ:
            log.info(
                "sampler=%s: drawing from the fit beside %s, made with %s (the settings "
                "given here are for fitting: mode=fit refits)",
                self.name,
                checkpoint,
                ", ".join(f"{k}={loaded.settings().get(k)}" for k in differ),
            )
        return loaded


def _any_label(states: dict[int, dict]) -> torch.Tensor | None:
    """A label that a fit of `states` draws (None: fitted to all images at once)."""
    return None if -1 in states else torch.tensor([min(states)])


class PriorSampler(LatentSampler):
    """The model's own prior p(z) (`model.prior`), at a temperature: nothing to fit or save.
    Its latents are the same for every class (the class enters the decoder only)."""

    name = "prior"
    needs_fit = False

    def __init__(self) -> None:
        super().__init__()

    @property
    def shared_across_classes(self) -> bool:
        return True

    def settings(self) -> dict:
        return {}

    def latents(
        self,
        model: CVAE,
        n: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        return model.sample_latents(n, temperature, generator)

    def save(self, checkpoint: str | Path) -> Path:
        raise ValueError(
            "sampler=prior has nothing to fit: mode=fit takes sampler=gmm or sampler=two_stage"
        )

    def loaded_for(self, checkpoint: str | Path) -> LatentSampler:
        return self


def check_dims(dims: int | None) -> None:
    if dims is not None and (not isinstance(dims, int) or dims < 1):
        raise ValueError(f"sampler.dims must be null or an integer >= 1, got {dims!r}")


def principal_axes(mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(centre, singular values, directions)` of the rows `mu`: their mean, and the
    singular value decomposition of the centred rows (directions as rows, the largest
    first). Sampler fits and traversals (`cvae.generation`) both start here."""
    centre = mu.mean(0)
    _, singular, directions = torch.linalg.svd(mu - centre, full_matrices=False)
    return centre, singular, directions


def principal_subspace(mu: torch.Tensor, dims: int | None) -> dict[str, torch.Tensor]:
    """The top `dims` principal directions of the means `mu` (`centre`, `basis`) and the
    Cholesky factor of what they leave (`residual_tril`); empty when `dims` is None or not
    below the latent size: the density is then fitted in all latent dimensions."""
    if dims is None or dims >= mu.shape[1]:
        return {}
    centre, _, directions = principal_axes(mu)
    basis = directions[:dims].T  # (latent_dim, dims), orthonormal columns
    residual = (mu - centre) - (mu - centre) @ basis @ basis.T
    jitter = 1e-8 * torch.eye(mu.shape[1], dtype=torch.float64)  # it has rank D - dims
    return {
        "centre": centre,
        "basis": basis,
        "residual_tril": torch.linalg.cholesky(residual.T.cov() + jitter),
    }


def to_coordinates(state: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Latents `z` in the fitted principal directions (unchanged without them)."""
    return (z - state["centre"]) @ state["basis"] if "basis" in state else z


def from_coordinates(
    state: dict[str, torch.Tensor],
    coords: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float,
) -> torch.Tensor:
    """Latents from coordinates drawn in the principal directions, the rest drawn from the
    Gaussian of what they leave, its spread scaled by `temperature`."""
    if "basis" not in state:
        return coords
    rest = torch.randn(len(coords), len(state["centre"]), generator=generator, dtype=torch.float64)
    residual = temperature * rest @ state["residual_tril"].T
    return state["centre"] + coords.double() @ state["basis"].T + residual


class GaussianMixtureSampler(LatentSampler):
    """scikit-learn's `GaussianMixture` of `components` components (`covariance`: full,
    diag, tied or spherical) fitted to posterior means; sampled in torch from the fitted
    means, weights and Cholesky factors. The defaults are `conf/sampler/gmm.yaml`'s.

    `dims`: fit the mixture in the top `dims` principal directions of the means (None: in
    all latent dimensions) and draw the rest from one Gaussian fitted to what those
    directions leave. A calibrated decoder's means keep nearly all their variance in a few
    dozen directions, where a mixture of many components fits in minutes instead of hours
    (docs/evaluation.md, "Samplers")."""

    name = "gmm"

    def __init__(
        self,
        components: int = 100,
        covariance: str = "full",
        dims: int | None = 64,
        seed: int = 0,
        max_images: int | None = 20_000,
    ) -> None:
        super().__init__(seed, max_images)
        if not isinstance(components, int) or components < 1:
            raise ValueError(f"sampler.components must be an integer >= 1, got {components!r}")
        if covariance not in COVARIANCES:
            raise ValueError(
                f"sampler.covariance={covariance!r} is not one of {', '.join(COVARIANCES)}"
            )
        check_dims(dims)
        self.components, self.covariance, self.dims = components, covariance, dims

    def settings(self) -> dict:
        return {
            **super().settings(),
            "components": self.components,
            "covariance": self.covariance,
            "dims": self.dims,
        }

    def _fit_one(self, mu: torch.Tensor, log_var: torch.Tensor) -> dict[str, torch.Tensor]:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.mixture import GaussianMixture

        state = principal_subspace(mu, self.dims)
        coords = to_coordinates(state, mu)
        components = min(self.components, len(coords))
        self._warn_if_too_many_parameters(components, *coords.shape)
        mixture = GaussianMixture(
            components,
            covariance_type=self.covariance,
            random_state=self.seed,
            reg_covar=1e-5,
            max_iter=EM_CHUNK,
            warm_start=True,  # each call goes on from the last: progress between calls
        )
        report = ProgressReport(EM_ITERATIONS, f"sampler={self.name} fit", unit="EM iterations")
        try:
            with warnings.catch_warnings():  # "did not converge" after each chunk but the last
                warnings.simplefilter("ignore", ConvergenceWarning)
                while report.done < EM_ITERATIONS:
                    mixture.fit(coords.numpy())
                    report.advance(mixture.n_iter_)
                    if mixture.converged_:
                        break
        finally:
            report.close()
        if not mixture.converged_:
            log.warning(
                "sampler=%s: EM stopped after %d iterations without converging (the fit is "
                "used as it is)",
                self.name,
                EM_ITERATIONS,
            )
        dims = coords.shape[1]
        covariances = torch.as_tensor(mixture.covariances_, dtype=torch.float64)
        if self.covariance == "tied":
            covariances = covariances.expand(components, dims, dims)
        elif self.covariance == "diag":
            covariances = torch.diag_embed(covariances)
        elif self.covariance == "spherical":
            covariances = covariances[:, None, None] * torch.eye(dims, dtype=torch.float64)
        return {
            **state,
            "weights": torch.as_tensor(mixture.weights_, dtype=torch.float64),
            "means": torch.as_tensor(mixture.means_, dtype=torch.float64),
            "scale_tril": torch.linalg.cholesky(covariances),
        }

    def parameters(self, components: int, dims: int) -> int:
        """How many numbers a mixture of `components` in `dims` dimensions fits: weights,
        means and the covariances of `self.covariance`."""
        per_covariance = {
            "full": dims * (dims + 1) // 2,
            "diag": dims,
            "spherical": 1,
            "tied": dims * (dims + 1) // 2 / components,
        }[self.covariance]
        return int(components * (1 + dims + per_covariance)) - 1

    def _warn_if_too_many_parameters(self, components: int, images: int, dims: int) -> None:
        """A warning when the mixture has more parameters than the posterior means have
        values: it then fits them one by one, and its samples copy training images."""
        parameters = self.parameters(components, dims)
        if parameters > images * dims:
            log.warning(
                "sampler=gmm: %d %s-covariance components in %d dimensions have %s "
                "parameters, more than the %s values of %s posterior means: the mixture "
                "memorises them and its samples copy training images; use fewer "
                "(sampler.components, sampler.dims) or sampler.covariance=diag",
                components,
                self.covariance,
                dims,
                f"{parameters:,}",
                f"{images * dims:,}",
                f"{images:,}",
            )

    def _sample_one(
        self,
        state: dict[str, torch.Tensor],
        n: int,
        generator: torch.Generator | None,
        temperature: float,
    ) -> torch.Tensor:
        component = torch.multinomial(state["weights"], n, replacement=True, generator=generator)
        eps = torch.randn(n, state["means"].shape[1], generator=generator, dtype=torch.float64)
        spread = (state["scale_tril"][component] @ eps[..., None]).squeeze(-1)
        coords = state["means"][component] + temperature * spread
        return from_coordinates(state, coords, generator, temperature)


class LatentVAE(nn.Module):
    """The second stage of Dai and Wipf (2019): a small VAE over the first model's latents,
    with a learned decoder variance gamma^2 (what lets it match the latents' density)."""

    def __init__(self, dims: int, latent_dim: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(dims, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * latent_dim),
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, dims),
        )
        self.log_gamma = nn.Parameter(torch.zeros(()))

    @classmethod
    def of_state(cls, state: dict[str, torch.Tensor]) -> LatentVAE:
        """The network a fitted state holds, its sizes read from the state."""
        hidden, latent_dim = state["decoder.0.weight"].shape
        network = cls(state["decoder.4.weight"].shape[0], latent_dim, hidden)
        network.load_state_dict({k: v for k, v in state.items() if k in network.state_dict()})
        return network

    def loss(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Negative ELBO of latents `z` per row, averaged: Gaussian decoder of variance
        gamma^2, KL to N(0, I)."""
        from cvae.models.losses import kl_divergence
        from cvae.models.networks import reparameterize

        mu, log_var = self.encoder(z).chunk(2, dim=1)
        mean = self.decoder(reparameterize(mu, log_var, generator))
        dims = z.shape[1]
        nll = (z - mean).pow(2).sum(1) / (2 * torch.exp(2 * self.log_gamma)) + dims * (
            self.log_gamma + 0.5 * math.log(2 * math.pi)
        )
        return (nll + kl_divergence(mu, log_var)).mean()

    def active_units(self, z: torch.Tensor, threshold: float = 0.01) -> int:
        """Latent dimensions whose posterior mean varies over `z` (variance above
        `threshold`): 0 means the second VAE collapsed and ignores its input."""
        with torch.no_grad():
            mu, _ = self.encoder(z).chunk(2, dim=1)
        return int((mu.var(0) > threshold).sum())

    def sample(self, n: int, generator: torch.Generator | None, temperature: float) -> torch.Tensor:
        """Ancestral draws: u ~ N(0, T^2 I), then the decoder's N(mean(u), T^2 gamma^2 I)."""
        with torch.no_grad():
            mean = self.decoder(
                temperature * torch.randn(n, self.decoder[0].in_features, generator=generator)
            )
            noise = torch.randn(mean.shape, generator=generator)
            return mean + temperature * self.log_gamma.exp() * noise


class TwoStageSampler(LatentSampler):
    """A second VAE (`LatentVAE`, latent size `latent_dim`, null: as many as it models)
    trained for `epochs` on latents drawn afresh each epoch from the cached posteriors, in
    the top `dims` principal directions of the means (null: all latent dimensions; the rest
    drawn from one Gaussian, as `gmm` does). Sampling draws from it ancestrally.

    Why the directions: a model that leaves most latents unused gives posteriors that are
    N(0, 1) noise in those dimensions; a second VAE over all 512 explained everything as
    noise and ignored its latent (docs/reports/sample-quality.md). A collapse is logged as a
    warning when the fit ends."""

    name = "two_stage"

    def __init__(
        self,
        latent_dim: int | None = None,
        hidden: int = 512,
        epochs: int = 60,
        lr: float = 1e-3,
        batch_size: int = 256,
        dims: int | None = 64,
        seed: int = 0,
        max_images: int | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__(seed, max_images)
        for key, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"sampler.{key} must be an integer >= 1, got {value!r}")
        if latent_dim is not None and (not isinstance(latent_dim, int) or latent_dim < 1):
            raise ValueError(
                f"sampler.latent_dim must be null or an integer >= 1, got {latent_dim!r}"
            )
        check_dims(dims)
        self.latent_dim, self.hidden, self.epochs, self.dims = latent_dim, hidden, epochs, dims
        self.lr, self.batch_size, self.progress = float(lr), batch_size, progress

    def settings(self) -> dict:
        return {
            **super().settings(),
            "latent_dim": self.latent_dim,
            "hidden": self.hidden,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "dims": self.dims,
        }

    def _fit_one(self, mu: torch.Tensor, log_var: torch.Tensor) -> dict[str, torch.Tensor]:
        from cvae.models.networks import reparameterize

        state = principal_subspace(mu, self.dims)
        dims = state["basis"].shape[1] if state else mu.shape[1]
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)  # the network's initial weights
            network = LatentVAE(dims, self.latent_dim or dims, self.hidden)
        mu, log_var = mu.float(), log_var.float()
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, self.epochs)
        report = ProgressReport(self.epochs * len(mu), "two-stage VAE", enabled=self.progress)
        try:
            for _ in range(self.epochs):
                z = reparameterize(mu, log_var, generator)  # fresh draws every epoch
                z = to_coordinates(state, z.double()).float()
                order = torch.randperm(len(z), generator=generator)
                for start in range(0, len(z), self.batch_size):
                    batch = z[order[start : start + self.batch_size]]
                    loss = network.loss(batch, generator)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    report.advance(len(batch))
                schedule.step()
        finally:
            report.close()
        active = network.active_units(to_coordinates(state, mu[:5000].double()).float())
        if active == 0:
            log.warning(
                "sampler=two_stage: the second VAE collapsed (it uses none of its %d "
                "latent dimensions): its samples come from one Gaussian; try "
                "sampler=gmm",
                network.decoder[0].in_features,
            )
        return {**state, **{k: v.detach() for k, v in network.state_dict().items()}}

    def _sample_one(
        self,
        state: dict[str, torch.Tensor],
        n: int,
        generator: torch.Generator | None,
        temperature: float,
    ) -> torch.Tensor:
        coords = LatentVAE.of_state(state).sample(n, generator, temperature)
        return from_coordinates(state, coords, generator, temperature)


def posteriors(
    model: CVAE,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_images: int | None = None,
    progress: bool = False,
) -> tuple[Posterior, torch.Tensor | None]:
    """The posterior of (up to `max_images` of) `batches`, every level, on the CPU, and
    their labels (a conditional model's only)."""
    report = ProgressReport(count_images(batches, max_images), "posteriors", enabled=progress)
    parts, labels, seen = [], [], 0
    try:
        for images, batch_labels in batches:
            if max_images is not None:
                left = max_images - seen
                images, batch_labels = images[:left], batch_labels[:left]
            with torch.no_grad():
                posterior = model.encode(images.to(model.device), model.given(batch_labels))
            parts.append(posterior.map(torch.Tensor.cpu))
            labels.append(batch_labels.cpu())
            seen += len(images)
            report.advance(len(images))
            if max_images is not None and seen >= max_images:
                break
    finally:
        report.close()
    return Posterior.cat(parts), torch.cat(labels) if model.conditional else None


def fit_and_save(
    sampler: LatentSampler,
    model: CVAE,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    checkpoint: str | Path,
    record_folder: str | Path,
) -> Path:
    """Fit `sampler` to the posteriors of `batches` (a model's training images, every one
    of them in a fixed order) and save it beside `checkpoint`; `record_folder/sampler.json`
    records the fit. The end of training (`callbacks.SamplerFit`) and `cvae.generate
    mode=fit` both come here."""
    if not sampler.needs_fit:
        sampler.save(checkpoint)  # the one-line refusal
    posterior, labels = posteriors(model, batches, sampler.max_images, progress=True)
    log.info(
        "%s: fitting to the posteriors of %d training images", sampler.describe(), len(posterior)
    )
    started = time.perf_counter()
    path = sampler.fit(posterior.mu, posterior.log_var, labels).save(checkpoint)
    record = {
        "sampler": sampler.name,
        "settings": sampler.settings(),
        "fit": str(path),
        "images": len(posterior),
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_write(Path(record_folder) / "sampler.json", "w") as handle:
        handle.write(json.dumps(record, indent=2) + "\n")
    log.info(
        "sampler=%s fitted in %.0f s: %s (cvae.generate and eval.fid draw from it with sampler=%s)",
        sampler.name,
        record["seconds"],
        path,
        sampler.name,
    )
    return path


def fitted_for(
    sampler: LatentSampler,
    model: CVAE,
    training_images: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    checkpoint: str | Path,
    record_folder: str | Path,
    refit: bool = False,
) -> LatentSampler:
    """`sampler` as fitted to `checkpoint`: the fit saved beside it or, where there is none
    (a run stopped before its end-of-training fit) or it is of an older version of the
    checkpoint (`NoFit`), one made now from `training_images()` (said first, then progress
    lines) and saved beside the checkpoint for the next call. What `cvae.generate`,
    `eval.fid` and the notebook draw from; `refit`: fit and save whatever is there
    (`cvae.generate mode=fit`)."""
    if refit:
        fit_and_save(sampler, model, training_images(), checkpoint, record_folder)
    try:
        return sampler.loaded_for(checkpoint)
    except NoFit:
        log.info(
            "%s is not fitted for %s (a run stopped before the end-of-training fit, or the "
            "checkpoint changed since): fitting it now to the training images (a pass over "
            "them, then for a mixture at most %d EM iterations: the time left that progress "
            "lines give is for all of them), saved beside the checkpoint for the next call",
            sampler.describe(),
            checkpoint,
            EM_ITERATIONS,
        )
    fit_and_save(sampler, model, training_images(), checkpoint, record_folder)
    return sampler.loaded_for(checkpoint)
