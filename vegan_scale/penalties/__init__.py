"""Latent penalties D_Z(Q_Z, P_Z) (pure torch)."""

from vegan_scale.penalties.adversarial import critic_log_loss, non_saturating_loss
from vegan_scale.penalties.kernel_mmd import mmd
from vegan_scale.penalties.kl import gaussian_kl
from vegan_scale.penalties.sliced import sliced_wasserstein

__all__ = ["critic_log_loss", "gaussian_kl", "mmd", "non_saturating_loss", "sliced_wasserstein"]
