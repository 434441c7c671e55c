"""How a network plugs in: two builders, listed in the registry (its options are in ``models/options.py``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

ImageShape = tuple[int, int, int]  # (channels, height, width)


@dataclass(frozen=True)
class NetworkSpec:
    """A registered network.

    ``encoder_body(options, image_shape)`` returns a module mapping images to feature vectors and the number of
    features (the encoder kinds put their heads on top); ``decoder_body(options, latent_dim, image_shape)`` returns
    a module mapping codes to image logits.
    """

    encoder_body: Callable[[Any, ImageShape], tuple[nn.Module, int]]
    decoder_body: Callable[[Any, int, ImageShape], nn.Module]
