"""The multilayer perceptron: pythae's default WAE pair (784-512-d and back) and the latent critic of WAE-GAN."""

from __future__ import annotations

from torch import nn

from vegan_scale.models.base import ImageShape, NetworkSpec
from vegan_scale.models.options import MLPConfig


def mlp(in_features: int, hidden: list[int], out_features: int) -> nn.Sequential:
    """Linear layers with ReLU between them."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


def mlp_encoder_body(cfg: MLPConfig, shape: ImageShape) -> tuple[nn.Module, int]:
    c, h, w = shape
    if not cfg.hidden:
        return nn.Flatten(), c * h * w
    body = mlp(c * h * w, cfg.hidden[:-1], cfg.hidden[-1])
    return nn.Sequential(nn.Flatten(), body, nn.ReLU(inplace=True)), cfg.hidden[-1]


def mlp_decoder_body(cfg: MLPConfig, latent_dim: int, shape: ImageShape) -> nn.Module:
    c, h, w = shape
    return nn.Sequential(mlp(latent_dim, list(reversed(cfg.hidden)), c * h * w), nn.Unflatten(1, shape))


SPEC = NetworkSpec(mlp_encoder_body, mlp_decoder_body)
