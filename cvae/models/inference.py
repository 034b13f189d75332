"""`FastDecoder`: the decoder's logits, the same function, computed faster for evaluation.

An importance-weighted bound decodes thousands of latents per image; on CPU the decoder's
time goes mostly to memory layouts and to the last doubling, whose one to three output
channels oneDNN handles poorly. Measured by benchmarks/eval_throughput.py.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from cvae.models.networks import Decoder, ResizeConv


class DoublingTaps(nn.Module):
    """A stride-2 transposed convolution that doubles its input, as one matrix product and
    a few shifted additions: every kernel tap's plane `W[:, c, ty, tx]^T h` at once (one
    GEMM, no zero taps), then output pixel `(2i + a, 2j + b)` sums the planes of the taps
    `t = a + p - 2e` at input pixel `(i + e, j + f)`. Exact (the same sums, reordered)."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        k, p = conv.kernel_size[0], conv.padding[0]
        self.k, self.out_channels = k, conv.out_channels
        weight = conv.weight.detach()  # (C_in, C_out, k, k)
        self.register_buffer("tap_weight", weight.flatten(1).T.contiguous())  # (C_out k k, C_in)
        bias = conv.bias.detach() if conv.bias is not None else weight.new_zeros(conv.out_channels)
        self.register_buffer("bias", bias.clone())
        self.terms = {  # phase (a, b): the (tap row, tap column, e, f) that reach it
            (a, b): [
                (a + p - 2 * e, b + p - 2 * f, e, f)
                for e in range(-k, k + 1)
                if 0 <= a + p - 2 * e < k
                for f in range(-k, k + 1)
                if 0 <= b + p - 2 * f < k
            ]
            for a in range(2)
            for b in range(2)
        }

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        """Whether `module` is a transposed convolution this class computes: square,
        stride 2, ungrouped, undilated, output exactly twice the input."""
        if not isinstance(module, nn.ConvTranspose2d):
            return False
        k, s, p = module.kernel_size[0], module.stride[0], module.padding[0]
        square = module.kernel_size[1] == k and module.stride[1] == s
        square = square and module.padding[1] == p and len(set(module.output_padding)) == 1
        return (
            square
            and s == 2
            and module.groups == 1
            and module.dilation == (1, 1)
            and module.output_padding[0] == 2 - k + 2 * p
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = h.shape
        rows = h.permute(0, 2, 3, 1).reshape(-1, channels)  # free for channels-last input
        planes = torch.mm(self.tap_weight, rows.T).view(
            self.out_channels, self.k, self.k, batch, height, width
        )
        out = h.new_zeros(self.out_channels, 2, 2, batch, height, width)
        for (a, b), terms in self.terms.items():
            phase = out[:, a, b]
            for ty, tx, e, f in terms:  # phase[i, j] += plane[i + e, j + f], inside the image
                i0, i1 = max(0, -e), height - max(0, e)
                j0, j1 = max(0, -f), width - max(0, f)
                phase[:, :, i0:i1, j0:j1] += planes[:, ty, tx, :, i0 + e : i1 + e, j0 + f : j1 + f]
        out += self.bias.view(-1, 1, 1, 1, 1, 1)
        # (C, a, b, B, i, j) -> (B, C, 2i + a, 2j + b)
        out = out.permute(3, 0, 4, 1, 5, 2)
        return out.reshape(batch, self.out_channels, 2 * height, 2 * width)


class FastDecoder(nn.Module):
    """`decoder.logits`, computed by a copy of `decoder` (the original is left as it is):
    the first Linear writes its output channels-last directly (its rows reordered), the
    convolutions run on channels-last weights, resize doublings run as the transposed
    convolutions they equal (`ResizeConv.as_transposed`: the kernel derived once, the
    weights being frozen), and the last transposed convolution runs as `DoublingTaps`.
    Equal to `decoder.logits` up to float rounding."""

    def __init__(self, decoder: Decoder) -> None:
        super().__init__()
        decoder = copy.deepcopy(decoder).eval()
        channels, height, width = decoder.start_shape
        order = torch.arange(channels * height * width).view(channels, height, width)
        order = order.permute(1, 2, 0).reshape(-1)  # (c, h, w) rows as (h, w, c)
        linear = decoder.project[0]
        with torch.no_grad():
            linear.weight.copy_(linear.weight[order])
            linear.bias.copy_(linear.bias[order])
        self.project, self.start_shape = decoder.project, decoder.start_shape
        layers = [  # the network without its Sigmoid
            layer.as_transposed() if isinstance(layer, ResizeConv) else layer
            for layer in list(decoder.features)[:-1]
        ]
        self.last = DoublingTaps(layers.pop()) if DoublingTaps.applies_to(layers[-1]) else None
        self.body = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.start_shape
        h = self.project(z).view(-1, height, width, channels).permute(0, 3, 1, 2)
        h = self.body(h)  # channels-last throughout
        return h if self.last is None else self.last(h)

    def decodes_per_call(self, budget: int = 2**22) -> int:
        """Latents per call such that the largest activation holds about `budget` values
        (16 MB): measured fastest on CPU, where larger tensors cost page faults on every
        call (a power of two, 64 to 4096)."""
        largest = [self.project[0].out_features]

        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            largest.append(output[0].numel())
            if module is self.last:  # its tap planes: k * k values per output pixel
                largest.append(inputs[0][0, 0].numel() * self.last.k**2 * module.out_channels)

        hooks = [m.register_forward_hook(record) for m in (*self.body, self.last) if m is not None]
        try:
            with torch.inference_mode():
                weight = self.project[0].weight
                self(torch.zeros(1, weight.shape[1], device=weight.device))
        finally:
            for hook in hooks:
                hook.remove()
        return 2 ** int(min(12, max(6, (budget // max(largest)).bit_length() - 1)))
