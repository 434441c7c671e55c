"""Sliced Wasserstein distance between Q_Z and P_Z: the SWAE recipe (Kolouri et al., ICLR 2019).

Codes and prior samples are projected on random unit directions; in one dimension optimal transport between two
equally large samples pairs their sorted values, so SW_p^p is a mean of |sorted difference|^p. Fresh directions
are drawn at every call, which makes the estimate unbiased over the directions.

At a finite batch the estimate is biased (about 0.19 at 25 samples and 0.055 at 100 when the codes already match
the prior), so its value, and lambda's meaning, depend on the batch it sees. With ``scope="global"`` every
process computes it over the global batch (the directions drawn on rank 0 and shared), equal to one process's
estimate on the concatenation, so that lambda means the same at every world size.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vegan_scale.models.outputs import LatentCodes
from vegan_scale.noise import StepNoise
from vegan_scale.penalties.base import LatentPenalty
from vegan_scale.penalties.global_batch import all_gather_rows, scale_gradient, with_own_rows, world_size
from vegan_scale.penalties.options import SlicedConfig
from vegan_scale.priors import Prior


def random_directions(count: int, dim: int, like: Tensor, noise: StepNoise | None = None) -> Tensor:
    """``count`` directions drawn uniformly on the unit sphere of R^dim, shape [count, dim] (from a training step's
    ``noise``: the same on every process; else from torch's generator)."""
    theta = torch.randn(count, dim, device=like.device, dtype=like.dtype) if noise is None else None
    theta = noise.shared("directions", (count, dim), like) if theta is None else theta
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


def global_sliced_wasserstein(z: Tensor, z_prior: Tensor, directions: Tensor, p: float = 2.0) -> Tensor:
    """SW_p^p of :func:`sliced_wasserstein` over the codes and prior samples of every process (concatenated in rank
    order; the same ``directions`` everywhere): the same value on every process, the gradient of this process's
    rows of ``z``."""
    return sliced_wasserstein(with_own_rows(z), all_gather_rows(z_prior.detach()), directions, p)


class SlicedPenalty(LatentPenalty):
    def __init__(self, projections: int, p: float, scope: str = "global") -> None:
        self.projections, self.p, self.scope = projections, p, scope

    def describe(self) -> str:
        return f"sliced (SW_{self.p:g}^{self.p:g}, {self.projections} directions, {self.scope})"

    def __call__(self, codes: LatentCodes, z_prior: Tensor, noise: StepNoise | None = None) -> Tensor:
        directions = random_directions(self.projections, codes.z.shape[1], codes.z, noise)
        world = world_size()
        if self.scope == "local" or world == 1:
            return sliced_wasserstein(codes.z, z_prior, directions, self.p)
        if noise is None:  # drawn by each process: rank 0's for all, one set for the global estimate
            torch.distributed.broadcast(directions, src=0)
        return scale_gradient(global_sliced_wasserstein(codes.z, z_prior, directions, self.p), float(world))


def build(cfg: SlicedConfig, prior: Prior, encoder: str) -> SlicedPenalty:
    if cfg.projections < 1 or cfg.p < 1:
        raise ValueError(f"penalty.sliced needs projections >= 1 and p >= 1 (got {cfg.projections}, {cfg.p})")
    return SlicedPenalty(cfg.projections, cfg.p, cfg.scope)
