"""`CVAE`: the Lightning module that trains the encoder and decoder on the negative ELBO."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import lightning.pytorch as pl
import torch

from cvae.models.losses import check_recon_loss, kl_divergence, reconstruction_loss
from cvae.models.networks import DOWNSAMPLING, Decoder, Encoder, reparameterize, unit_range


class CVAE(pl.LightningModule):
    """Convolutional VAE: loss = reconstruction + beta * KL, per image, averaged over the batch.

    Every constructor argument but `optimizer` and `scheduler` is a plain value saved in the
    checkpoint, so `CVAE.load_from_checkpoint(path)` needs no config. `optimizer` is a
    factory taking `(params, lr=...)` (default `torch.optim.Adam`); `scheduler` an optional
    factory taking the optimizer, stepped once per epoch.
    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 64,
        latent_dim: int = 512,
        hidden_channels: Sequence[int] = (32, 64, 128, 256),
        kernel_size: int = 4,
        downsample: str = "stride",
        batch_norm: bool = True,
        recon_loss: str = "mse",
        beta: float = 1.0,
        lr: float = 1e-3,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], object] | None = None,
    ) -> None:
        super().__init__()
        _validate(in_channels, image_size, latent_dim, hidden_channels, kernel_size, downsample,
                  recon_loss, beta, lr)  # fmt: skip
        hidden_channels = [int(c) for c in hidden_channels]
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer or torch.optim.Adam
        self.scheduler_factory = scheduler
        self.encoder = Encoder(
            in_channels,
            hidden_channels,
            image_size,
            latent_dim,
            kernel_size,
            downsample,
            batch_norm,
        )
        self.decoder = Decoder(
            in_channels, hidden_channels, image_size, latent_dim, kernel_size, batch_norm
        )

    # --- the model -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters `(mu, log_var)` of images `x` (uint8, or floats in [0, 1])."""
        return self.encoder(unit_range(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] decoded from latents `z` of shape `(B, latent_dim)`."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, log_var = self.encode(x)
        return self.decode(reparameterize(mu, log_var)), mu, log_var

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch means of the loss and its parts, each per image."""
        x = unit_range(x)
        x_hat, mu, log_var = self(x)
        recon = reconstruction_loss(x_hat, x, self.hparams.recon_loss).mean()
        kl = kl_divergence(mu.float(), log_var.float()).mean()
        return {"loss": recon + self.hparams.beta * kl, "recon": recon, "kl": kl}

    # --- for users -------------------------------------------------------------------------
    @contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode (BatchNorm running statistics) and no gradients, then back as it was."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.train(was_training)

    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`n` new images decoded from the prior N(0, temperature^2 I)."""
        z = torch.randn(n, self.hparams.latent_dim, generator=generator)
        with self._inference():
            return self.decode(temperature * z.to(self.device))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from their posterior means: the model's best guess of `x`."""
        with self._inference():
            mu, _ = self.encode(x.to(self.device))
            return self.decode(mu)

    # --- training --------------------------------------------------------------------------
    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, _ = batch
        terms = self.loss_terms(images)
        # Training curves per step; validation and test as means over the whole split.
        training = stage == "train"
        for name, value in terms.items():
            self.log(f"{stage}/{name}", value, on_step=training, on_epoch=not training,
                     prog_bar=name == "loss", batch_size=len(images))  # fmt: skip
        return terms["loss"]

    def _stop_unless_finite(self, loss: torch.Tensor, stage: str) -> None:
        """Stop before a diverged model is stepped (train) or checkpointed (val)."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{stage}/loss is {loss.item()} at epoch {self.current_epoch}, step "
                f"{self.global_step}: training stopped, the last good checkpoint is kept "
                "(try a lower model.lr or set trainer.gradient_clip_val)"
            )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        loss = self._step(batch, "train")
        self._stop_unless_finite(loss, "train")
        self.log("train/beta", self.hparams.beta, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._stop_unless_finite(self._step(batch, "val"), "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(self.parameters(), lr=self.hparams.lr)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"},
        }


def _validate(
    in_channels: int,
    image_size: int,
    latent_dim: int,
    hidden_channels: Sequence[int],
    kernel_size: int,
    downsample: str,
    recon_loss: str,
    beta: float,
    lr: float,
) -> None:
    """One-line errors naming the config key, raised before anything is built."""
    for key, value in (("in_channels", in_channels), ("image_size", image_size),
                       ("latent_dim", latent_dim), ("kernel_size", kernel_size)):  # fmt: skip
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.{key} must be a positive integer, got {value!r}")
    if not hidden_channels or not all(isinstance(c, int) and c >= 1 for c in hidden_channels):
        raise ValueError(
            "model.hidden_channels must be a non-empty list of positive widths, "
            f"got {list(hidden_channels)}"
        )
    if kernel_size < 2:
        raise ValueError(f"model.kernel_size must be >= 2, got {kernel_size}")
    if downsample not in DOWNSAMPLING:
        raise ValueError(f"model.downsample={downsample!r} is not one of {', '.join(DOWNSAMPLING)}")
    check_recon_loss(recon_loss)
    if not isinstance(beta, (int, float)) or beta < 0:
        raise ValueError(f"model.beta must be a number >= 0, got {beta!r}")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"model.lr must be a number > 0, got {lr!r}")
    factor = 2 ** len(hidden_channels)
    if image_size < factor or image_size % factor:
        raise ValueError(
            f"model.image_size={image_size} (data.image_size) is not divisible by {factor}: "
            f"model.hidden_channels has {len(hidden_channels)} blocks, each halving the image"
        )
