"""What every latent penalty D_Z(Q_Z, P_Z) provides, and how a penalty plugs into the schema.

A penalty is one file under ``penalties/`` holding its pure-torch math, a config dataclass for its options and a
``SPEC`` that the registry lists. The engine sees only :class:`LatentPenalty`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from vegan_scale.models.outputs import LatentCodes
from vegan_scale.priors import Prior


class LatentPenalty:
    """D_Z(Q_Z, P_Z) as a differentiable function of a batch of codes and an equally large prior sample.

    A penalty that trains a model of its own (the latent critic of WAE-GAN) sets ``critic`` and implements
    :meth:`critic_loss`; the engine gives that critic its own optimizer and step.
    """

    critic: nn.Module | None = None

    def __call__(self, codes: LatentCodes, z_prior: Tensor) -> Tensor:
        raise NotImplementedError

    def critic_loss(self, critic: nn.Module, z_q: Tensor, z_p: Tensor) -> Tensor:
        """The critic's own loss, through ``critic`` (this penalty's critic, possibly wrapped for distribution)."""
        raise NotImplementedError(f"{type(self).__name__} has no critic")


@dataclass(frozen=True)
class PenaltySpec:
    """A registered penalty: its options dataclass, how to build it, and a one-line description for the docs."""

    config: type
    build: Callable[[Any, Prior, str], LatentPenalty]  # (options, prior, encoder kind) -> penalty
    summary: str
    trains_critic: bool = False  # the penalty brings a model of its own, trained with its own optimizer
