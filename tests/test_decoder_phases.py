"""The resize doubling (`ResizeConv`) computes nearest 2x resizing then a 3x3 convolution
as one stride-2 transposed convolution: the same function, gradients and checkpoint keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cvae.models.inference import FastDecoder
from cvae.models.networks import Decoder, ResizeConv


def reference(layer: ResizeConv, x: torch.Tensor) -> torch.Tensor:
    """What the layer computed before: the resized map, then the 3x3 convolution."""
    resized = F.interpolate(x, scale_factor=2, mode="nearest")
    return F.conv2d(resized, layer[1].weight, layer[1].bias, padding=1)


def reference_decoder(decoder: Decoder, z: torch.Tensor) -> torch.Tensor:
    """`decoder.logits` with every `ResizeConv` computed the old way."""
    h = decoder.project(z).view(-1, *decoder.start_shape)
    for layer in list(decoder.features)[:-1]:
        h = reference(layer, h) if isinstance(layer, ResizeConv) else layer(h)
    return h


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (4, 4), (7, 5), (8, 16)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_layer_equals_resizing_then_convolving_in_float64(
    size: tuple[int, int], channels_last: bool
) -> None:
    torch.manual_seed(0)
    layer = ResizeConv(5, 3).double()
    x = torch.randn(2, 5, *size, dtype=torch.float64)
    if channels_last:
        layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    got, expected = layer(x), reference(layer, x)
    assert got.shape == (2, 3, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-12)
    torch.testing.assert_close(got, torch.nn.Sequential(*layer)(x), rtol=0.0, atol=1e-12)


def test_gradients_reach_the_3x3_weight_as_before() -> None:
    torch.manual_seed(1)
    layer = ResizeConv(4, 6).double()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 6, 10, 12, dtype=torch.float64)
    grads = []
    for compute in (layer, lambda x: reference(layer, x)):
        layer.zero_grad()
        x.grad = None
        (compute(x) * upstream).sum().backward()
        grads.append((layer[1].weight.grad.clone(), layer[1].bias.grad.clone(), x.grad.clone()))
    for got, expected in zip(*grads, strict=True):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize(
    ("image_size", "channels", "batch_norm", "residual_blocks", "channels_last"),
    [
        (16, [4, 8], False, 0, False),
        (32, [4, 8, 8], True, 1, True),
        (64, [4, 4, 8, 8], False, 0, True),
        (48, [4, 8, 8, 8], True, 0, False),  # a 3x3 map to start: odd sides
    ],
)
def test_the_decoder_computes_what_it_did(
    image_size: int,
    channels: list[int],
    batch_norm: bool,
    residual_blocks: int,
    channels_last: bool,
) -> None:
    torch.manual_seed(2)
    decoder = Decoder(
        3,
        channels,
        image_size,
        6,
        batch_norm=batch_norm,
        residual_blocks=residual_blocks,
        upsample="resize",
    )
    z = torch.randn(4, 6)
    decoder.train()(z)  # BatchNorm's running statistics away from their start
    decoder.eval()
    if channels_last:
        decoder.to(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = reference_decoder(decoder, z)
        assert expected.shape == (4, 3, image_size, image_size)
        torch.testing.assert_close(decoder.logits(z), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(FastDecoder(decoder)(z), expected, rtol=1e-5, atol=1e-5)
        decoder.double()
        expected = reference_decoder(decoder, z.double())
        torch.testing.assert_close(decoder.logits(z.double()), expected, rtol=0.0, atol=1e-12)
        fast = FastDecoder(decoder)(z.double())
        torch.testing.assert_close(fast, expected, rtol=0.0, atol=1e-12)


def test_state_dict_keys_and_shapes_are_those_of_the_resize_then_convolve_layer() -> None:
    decoder = Decoder(1, [4, 8], 16, 5, batch_norm=False, upsample="resize")
    old = torch.nn.Sequential(  # the layers `doubling` built before ResizeConv
        torch.nn.Upsample(scale_factor=2, mode="nearest"), torch.nn.Conv2d(8, 4, 3, padding=1)
    )
    assert (
        {k: v.shape for k, v in decoder.features[0].state_dict().items()}
        == {k: v.shape for k, v in old.state_dict().items()}
        == {"1.weight": (4, 8, 3, 3), "1.bias": (4,)}
    )
    old.load_state_dict(decoder.features[0].state_dict())
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(decoder.features[0](x), old(x), rtol=1e-5, atol=1e-5)

    copy = Decoder(1, [4, 8], 16, 5, batch_norm=False, upsample="resize")
    copy.load_state_dict(decoder.state_dict())  # strict: every key matches
    z = torch.randn(3, 5)
    assert torch.equal(copy(z), decoder(z))
    assert sorted(copy.state_dict()) == sorted(decoder.state_dict())


def test_the_equivalent_transposed_convolution_is_a_detached_copy() -> None:
    layer = ResizeConv(3, 2)
    transposed = layer.as_transposed()
    assert isinstance(transposed, torch.nn.ConvTranspose2d)
    assert transposed.weight.shape == (3, 2, 4, 4) and transposed.weight.grad_fn is None
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(transposed(x), reference(layer, x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer[1].weight.add_(1.0)
    assert not torch.allclose(transposed(x), layer(x))  # later training does not reach it
