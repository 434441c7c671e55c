"""The penalized optimal transport objective (Bousquet et al. 2017, eq. POT; Tolstikhin et al. 2018, WAE):

    D_POT = E_{X ~ P_X} E_{Z ~ Q(Z|X)} c(X, G(Z))  +  lambda * D_Z(Q_Z, P_Z)

estimated on a batch: X the images, Z their codes, G the decoder, D_Z the latent penalty against a prior sample of
the same size. The choice of c and D_Z picks the recipe: squared L2 with MMD is WAE-MMD, with the adversarial
penalty WAE-GAN (the AAE); the Bernoulli cost with the per-sample KL is the VAE; the sliced penalty is the SWAE.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from vegan_scale.costs import reconstruction_cost
from vegan_scale.models.autoencoder import AutoEncoderOutput
from vegan_scale.models.outputs import Reconstruction
from vegan_scale.noise import StepNoise
from vegan_scale.penalties.base import LatentPenalty
from vegan_scale.priors import Prior
from vegan_scale.registry import build_prior


class Cost(Protocol):
    """c(x, G(z)) per sample (a Gaussian decoder's sample drawn from ``noise``)."""

    def __call__(self, x: Tensor, recon: Reconstruction, noise: StepNoise | None = None) -> Tensor: ...


@dataclass
class ObjectiveTerms:
    loss: Tensor  # reconstruction + weight * penalty: what the auto-encoder minimises
    reconstruction: Tensor  # E c(X, G(Z))
    penalty: Tensor  # D_Z(Q_Z, P_Z)
    out: AutoEncoderOutput
    z_prior: Tensor


def pot_objective(
    model: nn.Module,
    prior: Prior,
    cost: Cost,
    penalty: LatentPenalty,
    weight: float,
    x: Tensor,
    noise: StepNoise | None = None,
) -> ObjectiveTerms:
    """One batch estimate of the POT objective; ``noise``: where its random numbers come from (vegan_scale.noise)."""
    out: AutoEncoderOutput = model(x, noise)  # Z ~ Q(Z|X), then G(Z)
    dtype = torch.promote_types(x.dtype, torch.float32)  # half-precision images still get float32 prior samples
    z_prior = prior.sample(len(x), device=x.device, dtype=dtype, noise=noise)  # as many draws from P_Z as codes
    reconstruction = cost(x, out.recon, noise=noise).mean()  # E c(X, G(Z))
    d_z = penalty(out.codes, z_prior, noise)  # D_Z(Q_Z, P_Z)
    return ObjectiveTerms(reconstruction + weight * d_z, reconstruction, d_z, out, z_prior)


@dataclass
class POT:
    """The parts of an experiment's objective: P_Z, c, D_Z and lambda (which an adaptive schedule changes)."""

    prior: Prior
    cost: Cost
    penalty: LatentPenalty
    weight: float

    @classmethod
    def of(cls, cfg: Any, penalty: LatentPenalty) -> POT:
        cost = functools.partial(reconstruction_cost, kind=cfg.cost.kind, scale=cfg.cost.scale)
        return cls(build_prior(cfg), cost, penalty, cfg.penalty.weight)

    def __call__(self, model: nn.Module, x: Tensor, noise: StepNoise | None = None) -> ObjectiveTerms:
        return pot_objective(model, self.prior, self.cost, self.penalty, self.weight, x, noise)
