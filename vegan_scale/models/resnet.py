"""A residual encoder/decoder family for 64x64 to 256x256 images, from a few million to billions of parameters.

Encoder: a 3x3 stem, then one stage per halving of the image side down to 4x4; a stage is ``depth`` residual
blocks followed by a stride-2 convolution that doubles the channels (up to ``width * max_multiplier``). Decoder:
the mirror image, a linear layer to a 4x4 feature map, stages of residual blocks each followed by nearest-neighbour
up-sampling and a 3x3 convolution, and a 3x3 output convolution. A residual block is
GroupNorm-SiLU-conv3x3-GroupNorm-SiLU-conv3x3 plus the identity. GroupNorm rather than batch norm: its statistics
are per sample, so they are the same whatever the number of processes and the per-process batch.

Size: about ``36 * depth * sum(c_i^2)`` weights per network over the stage channels c_i; ``width`` scales it
quadratically and ``depth`` linearly. Encoder and decoder together, for 64x64 images and d_z = 64: width 16,
depth 1: 1.8M; width 64, depth 2: 43M; width 128, depth 2: 171M; width 256, depth 4: 1.2B; width 512, depth 4: 4.9B.
"""

from __future__ import annotations

from itertools import pairwise

from torch import Tensor, nn

from vegan_scale.models.base import ImageShape, NetworkSpec
from vegan_scale.models.options import ResNetConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    g = groups
    while channels % g:
        g //= 2
    return nn.GroupNorm(g, channels)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _norm(channels, groups),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            _norm(channels, groups),
            nn.SiLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _stages(cfg: ResNetConfig, side: int) -> list[int]:
    """Channels of each stage, from the image side down to 4x4."""
    if side < 8 or side & (side - 1):
        raise ValueError(f"the residual networks need a power-of-two image side of at least 8, got {side}")
    count = side.bit_length() - 3  # halvings from side to 4
    return [cfg.width * min(2**i, cfg.max_multiplier) for i in range(count + 1)]


def resnet_encoder_body(cfg: ResNetConfig, shape: ImageShape) -> tuple[nn.Module, int]:
    c_in, side, _ = shape
    channels = _stages(cfg, side)
    layers: list[nn.Module] = [nn.Conv2d(c_in, channels[0], 3, padding=1)]
    for c, c_next in pairwise(channels):
        layers += [ResidualBlock(c, cfg.groups) for _ in range(cfg.depth)]
        layers.append(nn.Conv2d(c, c_next, 3, stride=2, padding=1))
    layers += [_norm(channels[-1], cfg.groups), nn.SiLU(), nn.Flatten()]
    return nn.Sequential(*layers), channels[-1] * 16


def resnet_decoder_body(cfg: ResNetConfig, latent_dim: int, shape: ImageShape) -> nn.Module:
    c_out, side, _ = shape
    channels = _stages(cfg, side)[::-1]
    layers: list[nn.Module] = [nn.Linear(latent_dim, channels[0] * 16), nn.Unflatten(1, (channels[0], 4, 4))]
    for c, c_next in pairwise(channels):
        layers += [ResidualBlock(c, cfg.groups) for _ in range(cfg.depth)]
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_next, 3, padding=1)]
    layers += [_norm(channels[-1], cfg.groups), nn.SiLU(), nn.Conv2d(channels[-1], c_out, 3, padding=1)]
    return nn.Sequential(*layers)


SPEC = NetworkSpec(resnet_encoder_body, resnet_decoder_body)
