"""How a class label enters the networks of a conditional VAE (`model.conditional=true`).

Both at the networks' boundaries, so `Encoder` and `Decoder` stay as they are, one input
wider: q(z | x, y) reads the image with one extra plane, a learned per-class map the size of
the image (as in the popular `ConditionalVAE`), and p(x | z, y) reads `z` concatenated with
a learned per-class code. docs/conditional.md ("How the label enters, and why") has the
measurements behind this choice (against FiLM and one-hot planes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

CODE_DIM = 32  # size of the decoder's class code; the decoder's first Linear layer reads it


def check_class_names(class_names: Sequence[str] | None) -> list[str]:
    """The class names as plain strings, or a one-line error naming the key."""
    names = [str(name) for name in class_names or []]
    if not names:
        raise ValueError(
            "model.conditional=true needs class names from the data (model.class_names), got none"
        )
    if len({name.lower() for name in names}) != len(names):
        raise ValueError(f"model.class_names must be distinct (ignoring case), got {names}")
    return names


class LabelConditioning(nn.Module):
    """The label's two ways in: a plane beside the image (encoder), a code beside z (decoder)."""

    def __init__(self, num_classes: int, image_size: int, code_dim: int = CODE_DIM) -> None:
        super().__init__()
        self.image_size = image_size
        self.plane = nn.Embedding(num_classes, image_size * image_size)
        self.code = nn.Embedding(num_classes, code_dim)

    def encoder_input(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """`(B, C + 1, H, W)`: the images with their class's plane as one more channel."""
        plane = self.plane(labels).view(-1, 1, self.image_size, self.image_size)
        return torch.cat([x, plane.to(x.dtype)], dim=1)

    def decoder_input(self, z: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """`(B, latent_dim + code_dim)`: latents with a class code (`self.code(labels)`, or a
        blend of codes for a walk between classes)."""
        return torch.cat([z, code.to(z.dtype)], dim=-1)


class LabelledEncoder(nn.Module):
    """`(images, labels) -> (mu, log_var)`: the conditional encoder as one module (export)."""

    def __init__(self, encoder: nn.Module, conditioning: LabelConditioning) -> None:
        super().__init__()
        self.encoder, self.conditioning = encoder, conditioning

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder(self.conditioning.encoder_input(images, labels))


class LabelledDecoder(nn.Module):
    """`(z, labels) -> images`: the conditional decoder as one module (export)."""

    def __init__(self, decoder: nn.Module, conditioning: LabelConditioning) -> None:
        super().__init__()
        self.decoder, self.conditioning = decoder, conditioning

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        code = self.conditioning.code(labels)
        return self.decoder(self.conditioning.decoder_input(z, code))
