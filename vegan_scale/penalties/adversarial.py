"""Adversarial latent penalty: WAE-GAN (WAE paper, Algorithm 1) and, with the squared-L2 cost, the adversarial
auto-encoder.

A critic D on latent codes is trained with the log-loss to tell prior samples (label 1) from codes (label 0). The
encoder's penalty is the non-saturating loss -log D(z~), which has the same fixed point as log(1 - D(z~)) but
strong gradients while the critic wins. Algorithm 1 multiplies the critic's loss by lambda; with Adam that
constant factor does not change the updates, so the critic loss here is unscaled and reads as a plain log-loss.

The official code's stabilisers (tolstikhin/wae) are options:

* ``p_trick`` (``gan_p_trick``, from AVB; the official CelebA recipe): the optimal critic of this game is
  log p_Z(z) - log q_Z(z), and p_Z is known, so the prior's log-density is added to the critic's logits and the
  network learns only the rest. The official code adds a vector of n log-densities to [n, 1] logits, which
  TensorFlow broadcasts to an [n, n] matrix (every logit paired with every code's density); here each code gets
  its own density, as the code's comment describes the trick;
* ``reencode``: the critic's step sees the codes of the batch encoded again after the auto-encoder's step, as the
  official code's separate ``session.run`` for the critic computes them (default: the codes of the same forward);
* ``init_std``: the official normal initialisation of the critic's weights.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from vegan_scale.models.autoencoder import init_weights
from vegan_scale.models.mlp import mlp
from vegan_scale.models.outputs import LatentCodes
from vegan_scale.noise import StepNoise
from vegan_scale.penalties.base import LatentPenalty, Parameters
from vegan_scale.penalties.options import AdversarialConfig
from vegan_scale.priors import Prior


def critic_log_loss(logits_prior: Tensor, logits_codes: Tensor) -> Tensor:
    """The critic's log-loss: -mean log D(z_p) - mean log(1 - D(z~)), with D = sigmoid(logits)."""
    return F.binary_cross_entropy_with_logits(
        logits_prior, torch.ones_like(logits_prior)
    ) + F.binary_cross_entropy_with_logits(logits_codes, torch.zeros_like(logits_codes))


def non_saturating_loss(logits_codes: Tensor) -> Tensor:
    """The encoder's adversarial penalty: -mean log D(z~)."""
    return F.binary_cross_entropy_with_logits(logits_codes, torch.ones_like(logits_codes))


def gaussian_log_density(z: Tensor, sigma2: float) -> Tensor:
    """log N(z; 0, sigma2 I) per row, as the official p-trick writes it, shape [n, 1]: -|z|^2 / (2 sigma2)
    - log(2 pi) / 2 - d log(sigma2) / 2 (its constant counts log(2 pi) once, not d times; a constant shift the
    network absorbs)."""
    normsq = z.pow(2).sum(dim=1, keepdim=True)
    return -normsq / 2 / sigma2 - 0.5 * math.log(2 * math.pi) - 0.5 * z.shape[1] * math.log(sigma2)


class PriorTrick(nn.Module):
    """A critic network whose logits get the Gaussian prior's log-density added (the p-trick)."""

    def __init__(self, net: nn.Module, sigma2: float) -> None:
        super().__init__()
        self.net, self.sigma2 = net, sigma2

    def forward(self, z: Tensor) -> Tensor:
        exact = z if z.dtype == torch.float64 else z.float()  # the density in float32 at least
        return self.net(z) + gaussian_log_density(exact, self.sigma2).to(z.dtype)


class AdversarialPenalty(LatentPenalty):
    """The encoder's adversarial term, computed with the critic's current parameters taken as constants.

    The encoder's step must not touch the critic: no gradient accumulates for it and no distributed wrapper of it
    takes part in this backward pass. So the critic's parameters (read through :meth:`use_critic`'s function,
    which the trainer points at the trained critic, gathering them first where they are sharded) are applied to a
    plain copy of its architecture.
    """

    name = "adversarial"

    def __init__(self, critic: nn.Module, lr: float, reencode: bool = False) -> None:
        self.critic, self.critic_lr, self.reencode = critic, lr, reencode
        self._shape = copy.deepcopy(critic)  # architecture only: its own parameters are never used
        self._parameters: Parameters = lambda: {name: p.detach() for name, p in critic.named_parameters()}

    def describe(self) -> str:
        return f"adversarial (latent critic, lr {self.critic_lr:g})"

    def use_critic(self, parameters: Parameters) -> None:
        self._parameters = parameters

    def __call__(self, codes: LatentCodes, z_prior: Tensor, noise: StepNoise | None = None) -> Tensor:
        params = self._parameters()
        dtype = next(iter(params.values())).dtype
        logits = functional_call(self._shape, params, (codes.z.to(dtype),))
        return non_saturating_loss(_at_least_float32(logits))

    def critic_loss(self, critic: nn.Module, z_q: Tensor, z_p: Tensor) -> Tensor:
        # One call on both samples: a distributed wrapper of the critic sees a single forward per backward.
        x = torch.cat([z_p, z_q.detach()])
        logits = _at_least_float32(critic(x.to(next(critic.parameters()).dtype)))
        return critic_log_loss(logits[: len(z_p)], logits[len(z_p) :])


def _at_least_float32(logits: Tensor) -> Tensor:
    """Losses in float32 even when the critic runs in half precision; float64 stays float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def build(cfg: AdversarialConfig, prior: Prior, encoder: str) -> AdversarialPenalty:
    critic = mlp(prior.dim, [cfg.hidden] * cfg.layers, 1)
    if cfg.init_std is not None:
        init_weights(critic, cfg.init_std)
    if cfg.p_trick:
        if prior.kind != "gaussian":
            raise ValueError(f"the p-trick needs a Gaussian prior, got {prior.kind!r}")
        critic = PriorTrick(critic, prior.variance)
    return AdversarialPenalty(critic, cfg.lr, cfg.reencode)
