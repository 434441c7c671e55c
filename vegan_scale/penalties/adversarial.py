"""Adversarial latent penalty: WAE-GAN (WAE paper, Algorithm 1) and, with the squared-L2 cost, the adversarial
auto-encoder.

A critic D on latent codes is trained with the log-loss to tell prior samples (label 1) from codes (label 0). The
encoder's penalty is the non-saturating loss -log D(z~), which has the same fixed point as log(1 - D(z~)) but
strong gradients while the critic wins. Algorithm 1 multiplies the critic's loss by lambda; with Adam that
constant factor does not change the updates, so the critic loss here is unscaled and reads as a plain log-loss.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from vegan_scale.config.fields import POSITIVE, at_least, param
from vegan_scale.models.mlp import mlp
from vegan_scale.models.outputs import LatentCodes
from vegan_scale.penalties.base import LatentPenalty, Parameters, PenaltySpec
from vegan_scale.priors import Prior


def critic_log_loss(logits_prior: Tensor, logits_codes: Tensor) -> Tensor:
    """The critic's log-loss: -mean log D(z_p) - mean log(1 - D(z~)), with D = sigmoid(logits)."""
    return F.binary_cross_entropy_with_logits(
        logits_prior, torch.ones_like(logits_prior)
    ) + F.binary_cross_entropy_with_logits(logits_codes, torch.zeros_like(logits_codes))


def non_saturating_loss(logits_codes: Tensor) -> Tensor:
    """The encoder's adversarial penalty: -mean log D(z~)."""
    return F.binary_cross_entropy_with_logits(logits_codes, torch.ones_like(logits_codes))


@dataclass
class AdversarialConfig:
    hidden: int = param(
        512, "Width of each hidden layer of the latent critic (the WAE MNIST recipe uses 512).", bounds=at_least(1)
    )
    layers: int = param(4, "Number of hidden layers of the latent critic (0: a linear critic).", bounds=at_least(0))
    lr: float = param(
        5e-4,
        "Adam learning rate of the critic (WAE MNIST recipe: 5e-4); follows the same schedule as the auto-encoder's.",
        bounds=POSITIVE,
    )


class AdversarialPenalty(LatentPenalty):
    """The encoder's adversarial term, computed with the critic's current parameters taken as constants.

    The encoder's step must not touch the critic: no gradient accumulates for it and no distributed wrapper of it
    takes part in this backward pass. So the critic's parameters (read through :meth:`use_critic`'s function,
    which the trainer points at the trained critic, gathering them first where they are sharded) are applied to a
    plain copy of its architecture.
    """

    name = "adversarial"

    def __init__(self, critic: nn.Module, lr: float) -> None:
        self.critic, self.critic_lr = critic, lr
        self._shape = copy.deepcopy(critic)  # architecture only: its own parameters are never used
        self._parameters: Parameters = lambda: {name: p.detach() for name, p in critic.named_parameters()}

    def describe(self) -> str:
        return f"adversarial (latent critic, lr {self.critic_lr:g})"

    def use_critic(self, parameters: Parameters) -> None:
        self._parameters = parameters

    def __call__(self, codes: LatentCodes, z_prior: Tensor) -> Tensor:
        params = self._parameters()
        dtype = next(iter(params.values())).dtype
        logits = functional_call(self._shape, params, (codes.z.to(dtype),))
        return non_saturating_loss(logits.float())

    def critic_loss(self, critic: nn.Module, z_q: Tensor, z_p: Tensor) -> Tensor:
        # One call on both samples: a distributed wrapper of the critic sees a single forward per backward.
        x = torch.cat([z_p, z_q.detach()])
        logits = critic(x.to(next(critic.parameters()).dtype)).float()
        return critic_log_loss(logits[: len(z_p)], logits[len(z_p) :])


def build(cfg: AdversarialConfig, prior: Prior, encoder: str) -> AdversarialPenalty:
    return AdversarialPenalty(mlp(prior.dim, [cfg.hidden] * cfg.layers, 1), cfg.lr)


SPEC = PenaltySpec(
    AdversarialConfig, build, "WAE-GAN / AAE: a latent critic with the non-saturating encoder loss", trains_critic=True
)
