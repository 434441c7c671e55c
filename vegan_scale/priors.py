"""Latent priors P_Z: samplers, the map of encoder outputs onto the prior's support, and the kernel scale.

The WAE recipes pair each prior with an encoder output map (identity for the Gaussian, projection onto the sphere,
tanh into the box) so that Q_Z lives where P_Z does. ``variance`` is the per-coordinate variance of P_Z; the MMD
kernels use ``2 * d * variance``, which is E||z - z'||^2 for two independent prior draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from vegan_scale.noise import StepNoise, normal, uniform


@dataclass(frozen=True)
class Prior:
    """A prior over R^d of one ``kind``; ``scale`` is sigma^2 (gaussian) or the radius (sphere, box)."""

    kind: str
    dim: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PRIOR_KINDS:
            raise ValueError(f"unknown prior {self.kind!r}; expected one of {PRIOR_KINDS}")
        if self.scale <= 0 or self.dim <= 0:
            raise ValueError(f"prior needs dim > 0 and scale > 0, got dim={self.dim}, scale={self.scale}")

    @property
    def variance(self) -> float:
        """Per-coordinate variance of P_Z."""
        if self.kind == "gaussian":
            return self.scale
        if self.kind == "sphere":
            return self.scale**2 / self.dim
        return self.scale**2 / 3.0  # uniform on [-r, r]

    def sample(
        self,
        n: int,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        noise: StepNoise | None = None,
    ) -> Tensor:
        """n independent draws from P_Z, shape [n, dim]: from ``generator``, or ``noise`` (a training step's), or
        torch's own generator."""
        shape, like = (n, self.dim), torch.empty(0, device=device, dtype=dtype)
        if self.kind == "box":
            return (2 * uniform(noise, "prior", shape, like, generator) - 1) * self.scale
        g = normal(noise, "prior", shape, like, generator)
        if self.kind == "gaussian":
            return g * math.sqrt(self.scale)
        return g / g.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny) * self.scale

    def to_support(self, h: Tensor) -> Tensor:
        """Map unconstrained encoder outputs onto the support of P_Z."""
        if self.kind == "gaussian":
            return h
        if self.kind == "sphere":
            return h / h.norm(dim=1, keepdim=True).clamp_min(1e-12) * self.scale
        return torch.tanh(h) * self.scale


PRIOR_KINDS = ("gaussian", "sphere", "box")
