"""How the class label should enter a conditional VAE, measured at equal training budget.

    python benchmarks/compare_conditioning.py [--steps 1500] [--image-size 32] [--threads 1]

Trains the default model on Fashion-MNIST (same seed, same batches) unconditionally and with
each way of conditioning, then measures on the first test images: the reconstruction error
from the posterior means, the negative ELBO (of log p(x) or log p(x | y)), and, with a small
classifier trained here on the real training images (independent of the VAEs), how often
samples drawn for a class are classified as that class ("sample accuracy") and how often a
test image decoded with another class's label becomes that class ("swap accuracy").
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cvae import CVAE, ImageDataModule, unit_range
from cvae.models.conditioning import LabelConditioning
from cvae.models.networks import Encoder


class ZeroPlane(LabelConditioning):
    """The encoder sees no label (q(z | x)); only the decoder is conditioned."""

    def encoder_input(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


class OneHotPlanes(LabelConditioning):
    """One constant plane per class (K extra encoder inputs) instead of one learned plane."""

    def encoder_input(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        planes = nn.functional.one_hot(labels, self.code.num_embeddings).to(x.dtype)
        return torch.cat([x, planes[:, :, None, None].expand(-1, -1, *x.shape[2:])], dim=1)


def build(variant: str, hp: dict, classes: list[str]) -> CVAE:
    """The default model with the label entering as `variant` says."""
    if variant == "unconditional":
        return CVAE(**hp)
    model = CVAE(**hp, conditional=True, class_names=classes)
    size, k = hp["image_size"], len(classes)
    if variant == "decoder code only":
        model.conditioning = ZeroPlane(k, size)
    elif variant == "one-hot planes + code":
        model.conditioning = OneHotPlanes(k, size)
        model.encoder = Encoder(
            hp["in_channels"] + k,
            model.hparams.hidden_channels,
            size,
            hp["latent_dim"],
            4,
            "stride",
            False,
        )
    elif variant == "plane + code + decoder FiLM":
        add_film(model, k)
    return model


def add_film(model: CVAE, num_classes: int) -> None:
    """FiLM: a per-class scale and shift of every activation of the decoder (hooks)."""
    relus = [m for m in model.decoder.modules() if isinstance(m, nn.ReLU)]
    widths = [model.decoder.start_shape[0]] + [
        m.out_channels for m in model.decoder.features if isinstance(m, nn.ConvTranspose2d)
    ]
    model.film = nn.ModuleList(nn.Embedding(num_classes, 2 * w) for w in widths[: len(relus)])
    for table in model.film:  # start as the identity: scale 1, shift 0
        nn.init.zeros_(table.weight)
    state: dict = {}

    def hook(index: int):
        def apply(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            scale, shift = model.film[index](state["labels"]).chunk(2, dim=-1)
            if output.ndim == 4:
                scale, shift = scale[:, :, None, None], shift[:, :, None, None]
            else:  # the projection's flat output: one scale per channel of the start map
                channels = widths[0]
                area = output.shape[1] // channels
                scale = scale.repeat_interleave(area, 1)
                shift = shift.repeat_interleave(area, 1)
            return output * (1 + scale) + shift

        return apply

    for index, relu in enumerate(relus):
        relu.inplace = False
        relu.register_forward_hook(hook(index))
    decode = model.decode

    def decode_with_film(z: torch.Tensor, labels=None) -> torch.Tensor:
        state["labels"] = model.class_indices(labels, len(z))
        return decode(z, labels)

    model.decode = decode_with_film


class Classifier(nn.Module):
    """A small CNN for the independent judge of which class an image shows."""

    def __init__(self, channels: int, size: int, classes: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (size // 4) ** 2, 128),
            nn.ReLU(),
            nn.Linear(128, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def batches(datamodule: ImageDataModule, steps: int):
    """`steps` training batches, the same ones in the same order for every caller."""
    torch.manual_seed(0)
    datamodule._samplers.clear()  # a fresh sampler: the same seed, so the same order
    done = 0
    while True:
        for images, labels in datamodule.train_dataloader():
            yield unit_range(images), labels
            done += 1
            if done == steps:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--latent-dim", type=int, default=512)
    parser.add_argument("--eval-images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    datamodule = ImageDataModule(
        source="fashion_mnist",
        root="data",
        image_size=args.image_size,
        channels=1,
        batch_size=64,
        num_workers=0,
    )
    datamodule.setup()
    classes = datamodule.labelled_classes()
    test = [datamodule.test_set[i] for i in range(args.eval_images)]
    x_test = unit_range(torch.stack([x for x, _ in test]))
    y_test = torch.tensor([y for _, y in test])

    torch.manual_seed(0)
    judge = Classifier(1, args.image_size, len(classes))
    optimizer = torch.optim.Adam(judge.parameters(), 1e-3)
    for x, y in batches(datamodule, 1000):
        loss = nn.functional.cross_entropy(judge(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    judge.eval()
    with torch.no_grad():
        judge_accuracy = float((judge(x_test).argmax(1) == y_test).float().mean())
    print(f"classifier accuracy on real test images: {judge_accuracy:.3f}", flush=True)

    hp = dict(in_channels=1, image_size=args.image_size, latent_dim=args.latent_dim)
    variants = (
        "unconditional",
        "plane + code",
        "decoder code only",
        "one-hot planes + code",
        "plane + code + decoder FiLM",
    )
    rows = []
    for variant in variants:
        torch.manual_seed(0)
        model = build(variant, hp, classes)
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        started = time.perf_counter()
        for x, y in batches(datamodule, args.steps):
            loss = model.loss_terms(x, y if model.conditional else None)["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - started
        model.eval()
        labels = y_test if model.conditional else None
        with torch.no_grad():
            mse = float((model.reconstruct(x_test, labels) - x_test).pow(2).mean())
            generator = torch.Generator().manual_seed(0)
            neg_elbo = float(-model.elbo(x_test, labels, generator=generator).mean())
            row = {"variant": variant, "mse": mse, "neg_elbo": neg_elbo, "seconds": seconds}
            if model.conditional:
                wanted = torch.arange(len(classes)).repeat_interleave(100)
                samples = model.sample(len(wanted), generator=generator, labels=wanted)
                row["sample_acc"] = float((judge(samples).argmax(1) == wanted).float().mean())
                shift = 1 + torch.randint(len(classes) - 1, y_test.shape, generator=generator)
                target = (y_test + shift) % len(classes)  # any class but the image's own
                mu, _ = model.encode(x_test, y_test)
                swapped = model.decode(mu, target)
                row["swap_acc"] = float((judge(swapped).argmax(1) == target).float().mean())
            else:  # chance level: samples carry no requested class
                samples = model.sample(1000, generator=generator)
                predicted = judge(samples).argmax(1)
                row["sample_acc"] = float((predicted == torch.arange(1000) % 10).float().mean())
        rows.append(row)
        print(row, flush=True)

    print(
        f"\nFashion-MNIST {args.image_size}x{args.image_size}, default model (latent "
        f"{args.latent_dim}), {args.steps} steps of batch 64, 1 thread; first "
        f"{args.eval_images} test images; judge accuracy on real images "
        f"{judge_accuracy:.3f}\n"
    )
    print(
        "| label enters as | recon MSE per pixel | neg. ELBO (nats) | sample accuracy | "
        "swap accuracy | train time |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        swap = f"{r['swap_acc']:.3f}" if "swap_acc" in r else "-"
        print(
            f"| {r['variant']} | {r['mse']:.4f} | {r['neg_elbo']:.1f} | "
            f"{r['sample_acc']:.3f} | {swap} | {r['seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main()
