"""Reconstruction costs c(X, G(Z)), one value per sample.

The metric costs carry the constant factors of the official WAE code (tolstikhin/wae ``reconstruction_loss``):
0.05 for squared L2, 0.2 for L2 and 0.02 for L1, all on per-image sums. They matter because the penalty weight
lambda of the recipes (10 for MNIST WAE-MMD) is relative to the *scaled* cost. ``bernoulli`` is the VAE baseline's
negative log-likelihood (sum over pixels, no factor). For a Gaussian decoder, the metric costs are taken on a
reparameterised sample of G(Z), so that the expectation in E c(X, G(Z)) covers the decoder's noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vegan_scale.models.outputs import Reconstruction
from vegan_scale.noise import StepNoise

COST_SCALES = {"l2sq": 0.05, "l2": 0.2, "l1": 0.02, "bernoulli": 1.0}
COST_KINDS = tuple(COST_SCALES)


def reconstruction_cost(
    x: Tensor, recon: Reconstruction, kind: str, scale: float | None = None, noise: StepNoise | None = None
) -> Tensor:
    """c(x, G(z)) per sample, shape [batch]; ``scale=None`` uses the WAE code's factor for that cost; a Gaussian
    decoder's sample draws from ``noise``."""
    if kind not in COST_SCALES:
        raise ValueError(f"unknown cost {kind!r}; expected one of {COST_KINDS}")
    factor = COST_SCALES[kind] if scale is None else scale
    # Sums over thousands of pixels: at least float32, even when the networks run in half precision.
    dtype = torch.promote_types(torch.promote_types(x.dtype, recon.logits.dtype), torch.float32)
    x = x.to(dtype)
    if kind == "bernoulli":
        per_pixel = F.binary_cross_entropy_with_logits(recon.logits.to(dtype), x, reduction="none")
        return factor * per_pixel.flatten(1).sum(dim=1)
    per_pixel = F.l1_loss if kind == "l1" else F.mse_loss  # |difference| or its square, in one pass each way
    total = per_pixel(recon.sample(noise).to(dtype), x, reduction="none").flatten(1).sum(dim=1)
    return factor * (torch.sqrt(1e-8 + total) if kind == "l2" else total)
