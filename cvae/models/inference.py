"""`FastDecoder`: the decoder's logits, the same function, computed faster for evaluation.

An importance-weighted bound decodes thousands of latents per image; on CPU the decoder's
time goes mostly to layouts and to the last transposed convolution, whose one to three
output channels oneDNN handles poorly. Measured by benchmarks/eval_throughput.py.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from cvae.models.networks import Decoder


def subpixel_weights(
    conv: nn.ConvTranspose2d,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int, int]] | None:
    """A stride-2 transposed convolution that doubles its input as a convolution to 4x the
    channels followed by `pixel_shuffle(2)`: `(weight, bias, padding)` of that convolution
    (padding as `F.pad` takes it), or None when the layer is not of that kind.

    Output row `2i + a` sums input rows `i + e` through kernel row `t = a + p - 2e`; the
    convolution's kernel covers every `e` used by either phase `a`, zero where unused."""
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    square = conv.kernel_size[1] == k and conv.stride[1] == s and conv.padding[1] == p
    if not square or s != 2 or conv.groups != 1 or conv.dilation != (1, 1):
        return None
    if conv.output_padding[0] != conv.output_padding[1] or 2 - k + 2 * p != conv.output_padding[0]:
        return None  # the output is not exactly twice the input
    offsets = [e for e in range(-k, k + 1) if any(0 <= a + p - 2 * e < k for a in (0, 1))]
    first, size = offsets[0], len(offsets)
    c_in, c_out = conv.in_channels, conv.out_channels
    weight = conv.weight.new_zeros(c_out, 2, 2, c_in, size, size)
    for a in range(2):
        for b in range(2):
            for i, e in enumerate(offsets):
                for j, f in enumerate(offsets):
                    ty, tx = a + p - 2 * e, b + p - 2 * f
                    if 0 <= ty < k and 0 <= tx < k:
                        weight[:, a, b, :, i, j] = conv.weight[:, :, ty, tx].T
    bias = conv.bias if conv.bias is not None else conv.weight.new_zeros(c_out)
    last = first + size - 1
    return weight.reshape(4 * c_out, c_in, size, size), bias.repeat_interleave(4), (
        -first, last, -first, last)  # fmt: skip


class FastDecoder(nn.Module):
    """`decoder.logits`, computed by a copy of `decoder` (the original is left as it is):
    the first Linear writes its output channels-last directly (its rows reordered), the
    convolutions run on channels-last weights, and the last transposed convolution runs as
    a convolution plus pixel shuffle. Equal to `decoder.logits` up to float rounding."""

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
        layers = list(decoder.features)[:-1]  # the network without its Sigmoid
        self.subpixel = subpixel_weights(layers[-1])
        if self.subpixel is not None:
            layers = layers[:-1]
            weight, bias, padding = self.subpixel
            weight = weight.contiguous(memory_format=torch.channels_last)
            self.register_buffer("last_weight", weight)
            self.register_buffer("last_bias", bias)
            self.padding = padding
        self.body = nn.Sequential(*layers).to(memory_format=torch.channels_last)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.start_shape
        h = self.project(z).view(-1, height, width, channels).permute(0, 3, 1, 2)
        h = self.body(h)  # channels-last throughout
        if self.subpixel is None:
            return h
        left, right = self.padding[:2]
        if left == right:  # the usual case: no padded copy of the activations
            h = F.conv2d(h, self.last_weight, self.last_bias, padding=left)
        else:
            h = F.conv2d(F.pad(h, self.padding), self.last_weight, self.last_bias)
        return F.pixel_shuffle(h, 2)
