"""pythae's MNIST benchmark pair, so that vegan_scale and pythae can be compared on the same network.

``Encoder_Conv_AE_MNIST``/``Decoder_Conv_AE_MNIST`` of pythae 0.1.2 (``pythae.models.nn.benchmarks.mnist``):
four 4x4 stride-2 convolutions (128-1024 channels, batch norm, ReLU) and a linear head; a linear layer to a 4x4
map of 1024 channels and three 3x3 stride-2 transposed convolutions. 17,076,361 parameters with d_z = 8, as in
pythae. The encoder's convolutions are :class:`vegan_scale.models.layers.Conv2d`: nn.Conv2d, with a faster path
for the last one (1x1 output). (The WAE paper's own network, vegan_scale's `conv`, decodes from 7x7 and costs
about 5x more.) The MLP pair is vegan_scale's `mlp` network with one hidden layer of 512, pythae's default pair.
"""

from __future__ import annotations

from torch import nn

from vegan_scale.models.base import ImageShape, NetworkSpec
from vegan_scale.models.layers import Conv2d, ConvTranspose2d
from vegan_scale.models.options import PythaeConvConfig


def _encoder(cfg: PythaeConvConfig, shape: ImageShape) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = []
    channels = shape[0]
    for out in (128, 256, 512, 1024):
        layers += [Conv2d(channels, out, 4, 2, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers, nn.Flatten()), 1024


def _decoder(cfg: PythaeConvConfig, latent_dim: int, shape: ImageShape) -> nn.Module:
    return nn.Sequential(
        nn.Linear(latent_dim, 1024 * 16),
        nn.Unflatten(1, (1024, 4, 4)),
        ConvTranspose2d(1024, 512, 3, 2, padding=1),
        nn.BatchNorm2d(512),
        nn.ReLU(),
        ConvTranspose2d(512, 256, 3, 2, padding=1, output_padding=1),
        nn.BatchNorm2d(256),
        nn.ReLU(),
        ConvTranspose2d(256, shape[0], 3, 2, padding=1, output_padding=1),
    )


SPEC = NetworkSpec(_encoder, _decoder)
