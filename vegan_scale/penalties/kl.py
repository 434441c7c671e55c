"""KL(Q(Z|X) || P_Z) per sample: the VAE recipe on the POT map.

Unlike MMD and the adversarial penalty, this penalises every conditional Q(Z|X=x) rather than the aggregate Q_Z,
which is why the VEGAN paper places the VAE beside, not inside, the POT family. It needs a Gaussian encoder and a
Gaussian prior, and is computed in closed form.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vegan_scale.models.outputs import LatentCodes
from vegan_scale.noise import StepNoise
from vegan_scale.penalties.base import LatentPenalty
from vegan_scale.penalties.options import GAUSSIAN, KLConfig
from vegan_scale.priors import Prior


def gaussian_kl(mean: Tensor, logvar: Tensor, sigma2: float = 1.0) -> Tensor:
    """Mean over the batch of KL(N(mean, diag exp(logvar)) || N(0, sigma2 I)), summed over latent coordinates."""
    if mean.dtype != torch.float64:  # in float32 even under autocast: exp(logvar) overflows half precision
        mean, logvar = mean.float(), logvar.float()
    per_coord = (logvar.exp() + mean.pow(2)) / sigma2 - 1.0 - logvar + math.log(sigma2)
    return 0.5 * per_coord.sum(dim=1).mean()


class KLPenalty(LatentPenalty):
    name = "kl"

    def __init__(self, sigma2: float) -> None:
        self.sigma2 = sigma2

    def __call__(self, codes: LatentCodes, z_prior: Tensor, noise: StepNoise | None = None) -> Tensor:
        assert codes.mean is not None and codes.logvar is not None  # guaranteed by build()
        return gaussian_kl(codes.mean, codes.logvar, self.sigma2)


def build(cfg: KLConfig, prior: Prior, encoder: str) -> KLPenalty:
    if encoder not in GAUSSIAN or prior.kind not in GAUSSIAN:
        raise ValueError(
            f"penalty.kind=kl needs model.encoder=gaussian and prior.kind=gaussian "
            f"(got encoder={encoder!r}, prior={prior.kind!r})"
        )
    return KLPenalty(prior.scale)
