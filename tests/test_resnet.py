"""The residual network family: shapes for every supported size, and parameter counts from the layer formula."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from vegan_scale.models.autoencoder import build_autoencoder
from vegan_scale.models.options import ResNetConfig
from vegan_scale.models.resnet import SPEC
from vegan_scale.priors import Prior


@pytest.mark.parametrize("side", [8, 64, 128])
def test_shapes(side: int) -> None:
    """Codes [B, d] and images [B, C, side, side] for small widths at several image sizes."""
    model = build_autoencoder(
        SPEC,
        ResNetConfig(width=8, depth=1, groups=4),
        (3, side, side),
        Prior("gaussian", 5),
        "deterministic",
        "deterministic",
        0,
    )
    out = model(torch.rand(2, 3, side, side))
    assert out.codes.z.shape == (2, 5) and out.recon.logits.shape == (2, 3, side, side)


def _weights(width: int, depth: int, side: int, latent: int, channels: int = 3, cap: int = 8) -> int:
    """Parameter count written out from the architecture's description (convolutions, GroupNorms, linears)."""
    stages = [width * min(2**i, cap) for i in range(side.bit_length() - 2)]
    conv = lambda a, b: 9 * a * b + b  # noqa: E731
    block = lambda c: 2 * conv(c, c) + 4 * c  # noqa: E731  (two convs, two GroupNorms)
    enc = conv(channels, stages[0]) + sum(depth * block(c) + conv(c, n) for c, n in pairwise(stages))
    enc += 2 * stages[-1] + (16 * stages[-1] * latent + latent)  # final norm, linear head
    rev = stages[::-1]
    dec = latent * 16 * rev[0] + 16 * rev[0]
    dec += sum(depth * block(c) + conv(c, n) for c, n in pairwise(rev))
    dec += 2 * rev[-1] + conv(rev[-1], channels)
    return enc + dec


@pytest.mark.parametrize(("width", "depth", "expected_m"), [(16, 1, 1.83), (128, 2, 171), (256, 4, 1229)])
def test_parameter_counts(width: int, depth: int, expected_m: float) -> None:
    """From 1.8M to 1.2B parameters (built on the meta device: no memory), as the formula counts them."""
    with torch.device("meta"):
        model = build_autoencoder(
            SPEC,
            ResNetConfig(width=width, depth=depth),
            (3, 64, 64),
            Prior("gaussian", 64),
            "deterministic",
            "deterministic",
            0,
        )
    count = sum(p.numel() for p in model.parameters())
    assert count == _weights(width, depth, 64, 64)
    assert count / 1e6 == pytest.approx(expected_m, rel=0.01)
