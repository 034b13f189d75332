"""Decodes per second of the importance-weighted (IWAE) evaluator, its share of the machine's
matmul rate, and how it compares with the evaluator it replaced, all in one process.

    python benchmarks/eval_throughput.py                      # experiment=fashion_mnist_nll
    python benchmarks/eval_throughput.py --preset default     # the default model and data
    python benchmarks/eval_throughput.py --k 200 --images 128 --rounds 3

The model is built from the training config with random weights (a decode costs the same
whatever the weights) and evaluated on random images of the data's shape. Measured here:
the dense fp32 matmul rate; the FLOPs of one decode (`torch.utils.flop_counter`: matmuls
and convolutions); then, alternating for `--rounds` rounds and keeping each one's best
(the machine may be shared: the load average is printed), (1) the replaced evaluator's
IWAE loop, kept below as the baseline: `torch.no_grad`, contiguous layout, binary cross
entropy on Sigmoid outputs against a copied target; (2) `CVAE.log_likelihood` as the
evaluator runs it (inference mode, `FastDecoder`: channels-last layout and a sub-pixel last
layer; likelihood from logits, images broadcast over samples); (3) the whole evaluator,
`cvae.metrics.evaluate_model`: chunks, ELBO, reconstructions and SSIM included. The last line
extrapolates to a full evaluation.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import compose_train, machine, matmul_rate, synchronize
from hydra.utils import instantiate
from torch.utils.flop_counter import FlopCounterMode

from cvae.metrics import evaluate_model
from cvae.models import CVAE
from cvae.models.inference import FastDecoder
from cvae.models.likelihoods import gaussian_log_density
from cvae.models.losses import normal_log_density
from cvae.models.networks import reparameterize
from cvae.pixels import unit_range

PRESETS = {  # overrides of the training config, the test split's size, the K to report
    "nll": (["experiment=fashion_mnist_nll"], 10_000, [5000]),
    "default": ([], 10_000, []),
}


def legacy_log_likelihood(
    model: CVAE, x: torch.Tensor, k: int, generator: torch.Generator, max_decodes: int = 4096
) -> torch.Tensor:
    """The IWAE loop of the evaluator before this one (the baseline), as it was."""
    with torch.no_grad():
        x = unit_range(x)
        mu, log_var = model.encode(x)
        chunk = max(1, max_decodes // len(x))
        total = torch.full((len(x),), -math.inf)
        for start in range(0, k, chunk):
            n = min(chunk, k - start)
            z = reparameterize(mu, log_var, generator, samples=n)
            x_hat = model.decode(z.flatten(0, 1))
            targets = x.unsqueeze(0).expand(n, *x.shape).flatten(0, 1)
            if model.likelihood.continuous:
                log_sigma = model.likelihood.current_log_sigma(x_hat, targets)
                log_px = gaussian_log_density(x_hat, targets, log_sigma)
            else:
                log_px = -F.binary_cross_entropy(x_hat, targets, reduction="none").flatten(1)
                log_px = log_px.sum(1)
            log_w = log_px.view(n, -1) + normal_log_density(z) - normal_log_density(z, mu, log_var)
            total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        return total - math.log(k)


def decode_flops(model: CVAE) -> float:
    """FLOPs of one decode (matmuls and convolutions; the likelihood's elementwise work and
    the activations are not counted)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.decode_logits(torch.zeros(1, model.hparams.latent_dim, device=model.device))
    return counter.get_total_flops()


def timed(run, device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of `run()`."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nll", choices=sorted(PRESETS))
    parser.add_argument("--k", type=int, default=100, help="importance samples per image")
    parser.add_argument("--images", type=int, default=128, help="images per timed run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    parser.add_argument(
        "--report-k",
        type=int,
        nargs="+",
        default=None,
        help="K of the extrapolated full evaluations (default: 5000 for nll, "
        "eval.iw_samples and 5000 for default)",
    )
    parser.add_argument(
        "--inception",
        action="store_true",
        help="also time Inception v3 forward passes (what FID costs)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides, split_images, report_ks = PRESETS[args.preset]
    if args.report_k:
        report_ks = args.report_k
    elif not report_ks:
        from omegaconf import OmegaConf

        eval_cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "eval.yaml")
        report_ks = [int(eval_cfg.eval.iw_samples), 5000]
    cfg = compose_train(
        Path(tempfile.mkdtemp(prefix="cvae-eval-bench-")), [*overrides, *args.overrides]
    )
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).eval()
    hp = model.hparams
    shape = (args.images, hp.in_channels, hp.image_size, hp.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8)
    if not model.likelihood.continuous:  # a Bernoulli model is evaluated on binary images
        images = (images > 127).to(torch.uint8) * 255
    x = unit_range(images.to(device))
    batches = [(batch, torch.zeros(len(batch))) for batch in images.split(cfg.data.batch_size)]

    load_before = os.getloadavg()
    peak = matmul_rate(device)
    flops = decode_flops(model)
    decodes = args.images * args.k

    def legacy() -> None:
        legacy_log_likelihood(model, x, args.k, torch.Generator().manual_seed(0))

    def iwae() -> None:
        generator, fast = torch.Generator().manual_seed(0), FastDecoder(model.decoder)
        model.log_likelihood(
            x, args.k, generator, max_decodes=fast.decodes_per_call(), decoder=fast
        )

    def evaluator() -> None:
        evaluate_model(model, batches, iw_samples=args.k)

    runs = {
        "replaced evaluator's IWAE loop (baseline)": legacy,
        "CVAE.log_likelihood, as evaluated now": iwae,
        "whole evaluator (cvae.metrics.evaluate_model)": evaluator,
    }
    best = {name: (math.inf, math.inf) for name in runs}
    for round_ in range(args.rounds + 1):  # round 0 warms up (oneDNN primitives, allocator)
        for name, run in runs.items():
            wall, cpu = timed(run, device)
            if round_:
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    load_after = os.getloadavg()
    threads = torch.get_num_threads()

    print(f"machine: {machine()}")
    print(
        f"load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
        f"on {os.cpu_count()} cores (above {threads}: shared with other processes)"
    )
    print(f"dense matmul rate (fp32): {peak / 1e9:,.1f} GFLOP/s")
    print(
        f"model: {args.preset} ({hp.image_size}x{hp.image_size}x{hp.in_channels}, latent "
        f"{hp.latent_dim}, widths {list(hp.hidden_channels)}, {hp.recon_loss}); "
        f"{flops / 1e6:,.2f} MFLOP per decode"
    )
    print(
        f"timed: {args.images} images x K={args.k} = {decodes:,} decodes, best of "
        f"{args.rounds} alternating rounds; per CPU-second: decodes over the CPU time of "
        f"this process's {threads} threads, which other processes do not inflate"
    )
    print(f"{'':44s} {'decodes/s':>9s}  {'GFLOP/s':>7s}  {'of matmul':>9s}  {'per CPU-s':>9s}")
    for name, (wall, cpu) in best.items():
        rate = decodes / wall
        print(
            f"{name:44s} {rate:9,.0f}  {rate * flops / 1e9:7.1f}  {rate * flops / peak:9.1%}  "
            f"{decodes / cpu:9,.0f}"
        )
    (baseline, baseline_cpu), (iwae_s, iwae_cpu), (whole_s, whole_cpu) = best.values()
    print(
        f"IWAE loop now / baseline: {baseline / iwae_s:.2f}x wall, "
        f"{baseline_cpu / iwae_cpu:.2f}x CPU time"
    )
    print(
        f"whole evaluator / baseline IWAE loop: {baseline / whole_s:.2f}x wall, "
        f"{baseline_cpu / whole_cpu:.2f}x CPU time"
    )
    # A full evaluation: per image, the evaluator's work besides the importance samples
    # (encoder, ELBO, reconstruction, SSIM, chunk files) plus K decodes at the loop's rate.
    for label, loop, whole, scale in (
        ("at the measured wall rate", iwae_s, whole_s, 1),
        (
            f"with {threads} unshared cores (CPU-time rate x {threads})",
            iwae_cpu,
            whole_cpu,
            threads,
        ),
    ):
        per_image = max(0.0, whole - loop) / args.images / scale
        for report_k in report_ks:
            seconds = split_images * (per_image + report_k * loop / scale / decodes)
            print(
                f"extrapolated, {label}: K={report_k} over {split_images:,} test images "
                f"takes {seconds / 60:,.1f} min ({per_image * 1e3:.1f} ms per image besides "
                f"its {report_k} decodes)"
            )
    if args.inception:
        inception_rate(device, args.rounds)


def inception_rate(device: torch.device, rounds: int, batch: int = 32) -> None:
    """Images/s through Inception v3 at 299x299, the cost of FID's features. torchvision's
    network with random weights: the architecture of torch-fidelity's (whose weights may
    not be on this machine), so the same work per image."""
    from torchvision.models import inception_v3

    network = inception_v3(weights=None, aux_logits=False, init_weights=False).to(device).eval()
    images = torch.rand(batch, 3, 299, 299, device=device)
    with torch.inference_mode():
        network(images[:2])
        with FlopCounterMode(display=False) as counter:
            network(images[:1])
        best = min(timed(lambda: network(images), device)[0] for _ in range(rounds))
    print(
        f"Inception v3 (299x299, {counter.get_total_flops() / 1e9:.1f} GFLOP per image): "
        f"{batch / best:,.1f} images/s; FID/KID on 10,000 samples + 10,000 images: "
        f"{20_000 / (batch / best) / 60:,.0f} min of features"
    )


if __name__ == "__main__":
    main()
