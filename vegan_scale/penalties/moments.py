"""Moment matching between Q_Z and P_Z: the loss of the official code's encoder pre-training (tolstikhin/wae
``pretrain_loss``).

Before the adversarial game starts, the encoder is fitted so that the mean and the covariance of its codes match
the prior's: ``mean((mu_p - mu_q)^2) + mean((Sigma_p - Sigma_q)^2)``, covariances with the n - 1 normaliser. A
critic facing codes already spread like the prior has a fair game to play.
"""

from __future__ import annotations

from torch import Tensor


def moment_matching_loss(z_q: Tensor, z_p: Tensor) -> Tensor:
    """Squared differences of the sample means and of the sample covariances of ``z_q`` and ``z_p`` ([n, d] each),
    averaged over their entries."""
    mean_gap = (z_p.mean(dim=0) - z_q.mean(dim=0)).pow(2).mean()
    return mean_gap + (covariance(z_p) - covariance(z_q)).pow(2).mean()


def covariance(z: Tensor) -> Tensor:
    """The sample covariance of the rows of ``z`` (n - 1 normaliser)."""
    centred = z - z.mean(dim=0, keepdim=True)
    return centred.T @ centred / (len(z) - 1)
