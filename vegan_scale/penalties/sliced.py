"""Sliced Wasserstein distance between Q_Z and P_Z: the SWAE recipe (Kolouri et al., ICLR 2019).

Codes and prior samples are projected on random unit directions; in one dimension optimal transport between two
equally large samples pairs their sorted values, so SW_p^p is a mean of |sorted difference|^p. Fresh directions
are drawn at every call, which makes the estimate unbiased over the directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vegan_scale.config.fields import at_least, param
from vegan_scale.models.outputs import LatentCodes
from vegan_scale.penalties.base import LatentPenalty, PenaltySpec
from vegan_scale.priors import Prior


def random_directions(count: int, dim: int, like: Tensor) -> Tensor:
    """``count`` directions drawn uniformly on the unit sphere of R^dim, shape [count, dim]."""
    theta = torch.randn(count, dim, device=like.device, dtype=like.dtype)
    return theta / theta.norm(dim=1, keepdim=True)


def sliced_wasserstein(z: Tensor, z_prior: Tensor, directions: Tensor, p: float = 2.0) -> Tensor:
    """SW_p^p between the rows of ``z`` and ``z_prior`` (both [n, d]) along ``directions`` [L, d]."""
    if z.shape != z_prior.shape:
        raise ValueError(
            f"sliced Wasserstein needs equally large samples, got {tuple(z.shape)} and {tuple(z_prior.shape)}"
        )
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        d = directions.to(dtype)
        proj_q = torch.sort(z.to(dtype) @ d.T, dim=0).values
        proj_p = torch.sort(z_prior.to(dtype) @ d.T, dim=0).values
        return (proj_q - proj_p).abs().pow(p).mean()


@dataclass
class SlicedConfig:
    projections: int = param(50, "Number of random directions per step.", bounds=at_least(1))
    p: float = param(2.0, "Order p of the sliced Wasserstein distance; the penalty is SW_p^p.", bounds=at_least(1))


class SlicedPenalty(LatentPenalty):
    def __init__(self, projections: int, p: float) -> None:
        self.projections, self.p = projections, p

    def describe(self) -> str:
        return f"sliced (SW_{self.p:g}^{self.p:g}, {self.projections} directions)"

    def __call__(self, codes: LatentCodes, z_prior: Tensor) -> Tensor:
        directions = random_directions(self.projections, codes.z.shape[1], codes.z)
        return sliced_wasserstein(codes.z, z_prior, directions, self.p)


def build(cfg: SlicedConfig, prior: Prior, encoder: str) -> SlicedPenalty:
    if cfg.projections < 1 or cfg.p < 1:
        raise ValueError(f"penalty.sliced needs projections >= 1 and p >= 1 (got {cfg.projections}, {cfg.p})")
    return SlicedPenalty(cfg.projections, cfg.p)


SPEC = PenaltySpec(SlicedConfig, build, "SWAE: sliced Wasserstein distance along random directions")
