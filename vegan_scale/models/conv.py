"""The WAE paper's DCGAN-style convolutional encoder and decoder.

Architecture (WAE paper, Appendix; tolstikhin/wae ``models.py``): four stride-2 convolutions ("SAME" padding,
so 28x28 images give 14, 7, 4 and 2 pixel feature maps) with
``width * (1, 2, 4, 8)`` channels, batch norm and ReLU, then a linear layer; the decoder is a linear layer to a
``8 * width`` feature map of side ``s``, stride-2 transposed convolutions halving the channels while doubling the
side, and a last stride-1 convolution to the image channels. Filters are 4x4 for 28x28 images and 5x5 for 64x64
(``kernel_size=0`` picks by image size). ``s`` is the image side divided by the largest power of two (at most 16)
that keeps it an integer of at least 7: 7 for 28x28 (two up-sampling layers), 8 for 64x64 (three).
"""

from __future__ import annotations

from torch import nn

from vegan_scale.models.base import ImageShape, NetworkSpec
from vegan_scale.models.layers import Conv2d, ConvTranspose2d
from vegan_scale.models.options import ConvConfig


def _kernel(cfg: ConvConfig, shape: ImageShape) -> int:
    if cfg.kernel_size:
        return cfg.kernel_size
    return 5 if shape[1] == 64 else 4


def _norm_relu(channels: int, batch_norm: bool) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)] if batch_norm else [nn.ReLU(inplace=True)]


def same_padding(side: int, k: int, stride: int) -> tuple[int, int]:
    """(before, after) padding that gives ceil(side / stride) outputs, as TensorFlow's "SAME" (the WAE code's)."""
    total = max((-(-side // stride) - 1) * stride + k - side, 0)
    return total // 2, total - total // 2


def _padded_conv(c_in: int, c_out: int, k: int, stride: int, side: int, bias: bool) -> list[nn.Module]:
    before, after = same_padding(side, k, stride)
    if before == after:
        return [Conv2d(c_in, c_out, k, stride=stride, padding=before, bias=bias)]
    return [nn.ZeroPad2d((before, after, before, after)), Conv2d(c_in, c_out, k, stride=stride, bias=bias)]


def conv_encoder_body(cfg: ConvConfig, shape: ImageShape) -> tuple[nn.Module, int]:
    c, side, _ = shape
    k = _kernel(cfg, shape)
    layers: list[nn.Module] = []
    for i in range(4):
        out = cfg.width * 2**i
        layers += _padded_conv(c, out, k, 2, side, bias=not cfg.batch_norm)
        layers += _norm_relu(out, cfg.batch_norm)
        c, side = out, -(-side // 2)
    return nn.Sequential(*layers, nn.Flatten()), c * side * side


def decoder_grid(side: int) -> tuple[int, int]:
    """(number of stride-2 up-sampling layers, side of the first feature map) for a square image of this side."""
    ups = 0
    while ups < 4 and side % 2 ** (ups + 1) == 0 and side // 2 ** (ups + 1) >= 7:
        ups += 1
    return ups, side // 2**ups


def conv_decoder_body(cfg: ConvConfig, latent_dim: int, shape: ImageShape) -> nn.Module:
    c_out, side, width = shape
    if side != width:
        raise ValueError(f"the convolutional decoder needs square images, got {side}x{width}")
    k = _kernel(cfg, shape)
    ups, s0 = decoder_grid(side)
    c = cfg.width * 8
    layers: list[nn.Module] = [nn.Linear(latent_dim, c * s0 * s0), nn.Unflatten(1, (c, s0, s0)), nn.ReLU(inplace=True)]
    for _ in range(ups):
        # padding and output_padding chosen so that every layer exactly doubles the side for k = 4 or 5
        up = ConvTranspose2d(
            c, c // 2, k, stride=2, padding=(k - 1) // 2, output_padding=k % 2, bias=not cfg.batch_norm
        )
        layers += [up, *_norm_relu(c // 2, cfg.batch_norm)]
        c //= 2
    layers += _padded_conv(c, c_out, k, 1, side, bias=True)  # stride-1 output layer, "SAME" padding
    return nn.Sequential(*layers)


SPEC = NetworkSpec(conv_encoder_body, conv_decoder_body)
