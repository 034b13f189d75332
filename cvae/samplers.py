"""Latent samplers: where the z of a new image comes from, once a model is trained.

A VAE's posteriors rarely fill its prior: N(0, I) draws land where no training image's
posterior lies, and decode to blobs. An ex-post sampler fits a density to where the
posteriors do lie and draws from that instead (Ghosh et al. 2020; Dai and Wipf 2019):
- `prior`: the model's own prior (`model.prior`), nothing to fit (`build_sampler` gives None:
  `CVAE.sample` draws from its prior);
- `gmm`: scikit-learn's `GaussianMixture` fitted to the posterior means of training images;
- `two_stage`: a small second VAE trained on latents drawn from the cached posteriors (in
  their top principal directions); its draws are decoded into the first model's latent space.

A fitted sampler is saved beside its checkpoint (`<checkpoint stem>.<name>.pt`, plain tensors
that `torch.load(weights_only=True)` reads) with the checkpoint's SHA-256, so sampling later
needs no data and no network, and a sampler fitted to an older `last.ckpt` is refused. A
conditional model gets one density per class. Every sampler draws on the CPU with a
`torch.Generator`: the same seed gives the same latents.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from cvae.models import CVAE

log = logging.getLogger(__name__)
SAMPLERS = ("prior", "gmm", "two_stage")
COVARIANCES = ("full", "diag", "tied", "spherical")  # scikit-learn's covariance_type


def sampler_path(checkpoint: str | Path, name: str) -> Path:
    """Where the fitted sampler `name` of `checkpoint` is kept: beside it."""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.stem}.{name}.pt")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def fit_command(checkpoint: str | Path, name: str) -> str:
    return f".venv/bin/python -m cvae.generate mode=fit sampler={name} ckpt_path={checkpoint}"


class LatentSampler:
    """Base of the ex-post samplers: `fit` on posteriors, `sample` latents, `save`/`load`.

    Subclasses implement `_fit_one` (one density from `(mu, log_var)` rows) and
    `_sample_one` (latents from one fitted state); the base handles classes, files and the
    generator."""

    name = ""

    def __init__(self, seed: int = 0, max_images: int | None = None) -> None:
        if max_images is not None and (not isinstance(max_images, int) or max_images < 2):
            raise ValueError(f"sampler.max_images must be null or an integer >= 2, "
                             f"got {max_images!r}")  # fmt: skip
        self.seed, self.max_images = int(seed), max_images
        self.states: dict[int, dict[str, torch.Tensor]] = {}  # class index (-1: all) -> state

    @property
    def fitted(self) -> bool:
        return bool(self.states)

    def settings(self) -> dict:
        """The plain settings saved with the fit (what the file says it is)."""
        return {"seed": self.seed, "max_images": self.max_images}

    # --- fitting -------------------------------------------------------------------------
    def fit(
        self, mu: torch.Tensor, log_var: torch.Tensor, labels: torch.Tensor | None = None
    ) -> LatentSampler:
        """Fit to posteriors `(mu, log_var)`, `(N, latent_dim)`; with `labels` (a conditional
        model's class indices) one density per class."""
        mu, log_var = mu.detach().double().cpu(), log_var.detach().double().cpu()
        groups = {-1: torch.arange(len(mu))} if labels is None else {
            int(c): (labels == c).nonzero().flatten() for c in labels.unique()}  # fmt: skip
        self.states = {}
        for index, rows in groups.items():
            if len(rows) < 2:
                raise ValueError(f"sampler={self.name}: class {index} has {len(rows)} image(s); "
                                 "a density needs at least 2")  # fmt: skip
            self.states[index] = self._fit_one(mu[rows], log_var[rows])
        return self

    def _fit_one(self, mu: torch.Tensor, log_var: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # --- sampling ------------------------------------------------------------------------
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        labels: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor:
        """`n` latents `(n, latent_dim)` on the CPU; a conditional model's from the density of
        each row's class (`labels`, class indices), drawn class by class in index order."""
        if not self.fitted:
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
        self, state: dict[str, torch.Tensor], n: int, generator: torch.Generator | None,
        temperature: float,
    ) -> torch.Tensor:  # fmt: skip
        raise NotImplementedError

    # --- files ---------------------------------------------------------------------------
    def save(self, checkpoint: str | Path) -> Path:
        """Write the fit beside `checkpoint` (to a partial file, then renamed over)."""
        path = sampler_path(checkpoint, self.name)
        contents = {"sampler": self.name, "settings": self.settings(),
                    "checkpoint_sha256": file_sha256(checkpoint),
                    "states": {str(k): v for k, v in self.states.items()}}  # fmt: skip
        partial = path.with_suffix(".partial")
        torch.save(contents, partial)
        partial.replace(path)
        return path

    def load(self, checkpoint: str | Path) -> LatentSampler:
        """The fit saved beside `checkpoint`: a one-line error saying how to fit it when
        there is none, or when the checkpoint changed since (a `last.ckpt` trained on)."""
        path = sampler_path(checkpoint, self.name)
        if not path.is_file():
            raise FileNotFoundError(f"sampler={self.name} is not fitted for {checkpoint} (no "
                                    f"{path.name} beside it): fit it with: "
                                    f"{fit_command(checkpoint, self.name)} (or draw from the "
                                    "model's prior: sampler=prior)")  # fmt: skip
        contents = torch.load(path, map_location="cpu", weights_only=True)
        if contents.get("checkpoint_sha256") != file_sha256(checkpoint):
            raise ValueError(f"{path} was fitted to another version of {checkpoint} (it has "
                             f"changed since): fit it again with: "
                             f"{fit_command(checkpoint, self.name)}")  # fmt: skip
        self.states = {int(k): v for k, v in contents["states"].items()}
        return self


def check_dims(dims: int | None) -> None:
    if dims is not None and (not isinstance(dims, int) or dims < 1):
        raise ValueError(f"sampler.dims must be null or an integer >= 1, got {dims!r}")


def principal_directions(mu: torch.Tensor, dims: int | None) -> dict[str, torch.Tensor]:
    """The top `dims` principal directions of the means `mu` (`centre`, `basis`) and the
    Cholesky factor of what they leave (`residual_tril`); empty when `dims` is None or not
    below the latent size: the density is then fitted in all latent dimensions."""
    if dims is None or dims >= mu.shape[1]:
        return {}
    centre = mu.mean(0)
    _, _, directions = torch.linalg.svd(mu - centre, full_matrices=False)
    basis = directions[:dims].T  # (latent_dim, dims), orthonormal columns
    residual = (mu - centre) - (mu - centre) @ basis @ basis.T
    jitter = 1e-8 * torch.eye(mu.shape[1], dtype=torch.float64)  # it has rank D - dims
    return {"centre": centre, "basis": basis,
            "residual_tril": torch.linalg.cholesky(residual.T.cov() + jitter)}  # fmt: skip


def to_coordinates(state: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Latents `z` in the fitted principal directions (unchanged without them)."""
    return (z - state["centre"]) @ state["basis"] if "basis" in state else z


def from_coordinates(
    state: dict[str, torch.Tensor], coords: torch.Tensor, generator: torch.Generator | None,
    temperature: float,
) -> torch.Tensor:  # fmt: skip
    """Latents from coordinates drawn in the principal directions, the rest drawn from the
    Gaussian of what they leave, its spread scaled by `temperature`."""
    if "basis" not in state:
        return coords
    rest = torch.randn(len(coords), len(state["centre"]), generator=generator,
                       dtype=torch.float64)  # fmt: skip
    residual = temperature * rest @ state["residual_tril"].T
    return state["centre"] + coords.double() @ state["basis"].T + residual


class GaussianMixtureSampler(LatentSampler):
    """scikit-learn's `GaussianMixture` of `components` components (`covariance`: full,
    diag, tied or spherical) fitted to posterior means; sampled in torch from the fitted
    means, weights and Cholesky factors. The defaults are `conf/sampler/gmm.yaml`'s.

    `dims`: fit the mixture in the top `dims` principal directions of the means (None: in
    all latent dimensions) and draw the rest from one Gaussian fitted to what those
    directions leave. A calibrated decoder's 512-d means keep 99.5% of their variance in 64
    directions, where a 100-component mixture fits in minutes instead of hours (measured in
    docs/evaluation.md, "Samplers")."""

    name = "gmm"

    def __init__(self, components: int = 100, covariance: str = "full", dims: int | None = 64,
                 seed: int = 0, max_images: int | None = None) -> None:  # fmt: skip
        super().__init__(seed, max_images)
        if not isinstance(components, int) or components < 1:
            raise ValueError(f"sampler.components must be an integer >= 1, got {components!r}")
        if covariance not in COVARIANCES:
            raise ValueError(f"sampler.covariance={covariance!r} is not one of "
                             f"{', '.join(COVARIANCES)}")  # fmt: skip
        check_dims(dims)
        self.components, self.covariance, self.dims = components, covariance, dims

    def settings(self) -> dict:
        return {**super().settings(), "components": self.components,
                "covariance": self.covariance, "dims": self.dims}  # fmt: skip

    def _fit_one(self, mu: torch.Tensor, log_var: torch.Tensor) -> dict[str, torch.Tensor]:
        from sklearn.mixture import GaussianMixture

        state = principal_directions(mu, self.dims)
        coords = to_coordinates(state, mu)
        components = min(self.components, len(coords))
        mixture = GaussianMixture(components, covariance_type=self.covariance,
                                  random_state=self.seed, reg_covar=1e-5)  # fmt: skip
        mixture.fit(coords.numpy())
        dims = coords.shape[1]
        covariances = torch.as_tensor(mixture.covariances_, dtype=torch.float64)
        if self.covariance == "tied":
            covariances = covariances.expand(components, dims, dims)
        elif self.covariance == "diag":
            covariances = torch.diag_embed(covariances)
        elif self.covariance == "spherical":
            covariances = covariances[:, None, None] * torch.eye(dims, dtype=torch.float64)
        return {**state, "weights": torch.as_tensor(mixture.weights_, dtype=torch.float64),
                "means": torch.as_tensor(mixture.means_, dtype=torch.float64),
                "scale_tril": torch.linalg.cholesky(covariances)}  # fmt: skip

    def _sample_one(
        self, state: dict[str, torch.Tensor], n: int, generator: torch.Generator | None,
        temperature: float,
    ) -> torch.Tensor:  # fmt: skip
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
        self.encoder = nn.Sequential(nn.Linear(dims, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                     nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))  # fmt: skip
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(),
                                     nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, dims))  # fmt: skip
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
        nll = ((z - mean).pow(2).sum(1) / (2 * torch.exp(2 * self.log_gamma))
               + dims * (self.log_gamma + 0.5 * math.log(2 * math.pi)))  # fmt: skip
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
            mean = self.decoder(temperature * torch.randn(n, self.decoder[0].in_features,
                                                          generator=generator))  # fmt: skip
            noise = torch.randn(mean.shape, generator=generator)
            return mean + temperature * self.log_gamma.exp() * noise


class TwoStageSampler(LatentSampler):
    """A second VAE (`LatentVAE`, latent size `latent_dim`, null: as many as it models)
    trained for `epochs` on latents drawn afresh each epoch from the cached posteriors, in
    the top `dims` principal directions of the means (null: all latent dimensions; the rest
    drawn from one Gaussian, as `gmm` does). Sampling draws from it ancestrally.

    Why the directions: a model that leaves most latents unused gives posteriors that are
    N(0, 1) noise in those dimensions; a second VAE over all 512 explained everything as
    noise and ignored its latent (measured: one image 5,000 times, in
    docs/reports/sample-quality.md). A collapse is logged as a warning when the fit ends."""

    name = "two_stage"

    def __init__(self, latent_dim: int | None = None, hidden: int = 512, epochs: int = 60,
                 lr: float = 1e-3, batch_size: int = 256, dims: int | None = 64, seed: int = 0,
                 max_images: int | None = None, progress: bool = False) -> None:  # fmt: skip
        super().__init__(seed, max_images)
        for key, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"sampler.{key} must be an integer >= 1, got {value!r}")
        if latent_dim is not None and (not isinstance(latent_dim, int) or latent_dim < 1):
            raise ValueError(f"sampler.latent_dim must be null or an integer >= 1, "
                             f"got {latent_dim!r}")  # fmt: skip
        check_dims(dims)
        self.latent_dim, self.hidden, self.epochs, self.dims = latent_dim, hidden, epochs, dims
        self.lr, self.batch_size, self.progress = float(lr), batch_size, progress

    def settings(self) -> dict:
        return {**super().settings(), "latent_dim": self.latent_dim, "hidden": self.hidden,
                "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "dims": self.dims}  # fmt: skip

    def _fit_one(self, mu: torch.Tensor, log_var: torch.Tensor) -> dict[str, torch.Tensor]:
        from cvae.metrics import ProgressReport
        from cvae.models.networks import reparameterize

        state = principal_directions(mu, self.dims)
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
            log.warning("sampler=two_stage: the second VAE collapsed (it uses none of its %d "
                        "latent dimensions): its samples come from one Gaussian; try "
                        "sampler=gmm", network.decoder[0].in_features)  # fmt: skip
        return {**state, **{k: v.detach() for k, v in network.state_dict().items()}}

    def _sample_one(
        self, state: dict[str, torch.Tensor], n: int, generator: torch.Generator | None,
        temperature: float,
    ) -> torch.Tensor:  # fmt: skip
        coords = LatentVAE.of_state(state).sample(n, generator, temperature)
        return from_coordinates(state, coords, generator, temperature)


def posteriors(
    model: CVAE, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    max_images: int | None = None, progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """`(mu, log_var, labels)` of (up to `max_images` of) `batches`, on the CPU; labels only
    for a conditional model."""
    from cvae.metrics import ProgressReport, count_images

    report = ProgressReport(count_images(batches, max_images), "posteriors", enabled=progress)
    mus, log_vars, labels, seen = [], [], [], 0
    try:
        for images, batch_labels in batches:
            if max_images is not None:
                left = max_images - seen
                images, batch_labels = images[:left], batch_labels[:left]
            given = batch_labels if model.conditional else None
            with torch.no_grad():
                mu, log_var = model.encode(images.to(model.device), given)
            mus.append(mu.cpu())
            log_vars.append(log_var.cpu())
            labels.append(batch_labels.cpu())
            seen += len(images)
            report.advance(len(images))
            if max_images is not None and seen >= max_images:
                break
    finally:
        report.close()
    return torch.cat(mus), torch.cat(log_vars), torch.cat(labels) if model.conditional else None


def build_sampler(name: str, **settings: object) -> LatentSampler | None:
    """The unfitted sampler `name` with its `settings` (config group `sampler`); None for
    `prior`, the model's own. A one-line error naming the key for anything else."""
    if name == "prior":
        return None
    kinds = {"gmm": GaussianMixtureSampler, "two_stage": TwoStageSampler}
    if name not in kinds:
        raise ValueError(f"sampler={name!r} is not one of {', '.join(SAMPLERS)}")
    return kinds[name](**settings)
