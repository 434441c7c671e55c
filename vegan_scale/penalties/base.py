"""What every latent penalty D_Z(Q_Z, P_Z) provides, and how a penalty plugs in.

A penalty is one file under ``penalties/`` holding its pure-torch math and a ``build`` function (a
:data:`PenaltyBuilder`) that the registry lists; its options are in ``penalties/options.py``. The engine sees only
:class:`LatentPenalty` and asks it what it needs: whether it brings a critic of its own to train (and at which
learning rate), and how to describe itself; it never reads the penalty's options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from vegan_scale.models.outputs import LatentCodes
from vegan_scale.noise import StepNoise
from vegan_scale.priors import Prior

Parameters = Callable[[], dict[str, Tensor]]  # a module's current parameters, as constants
PenaltyBuilder = Callable[[Any, Prior, str], "LatentPenalty"]  # (options, prior, encoder kind) -> the penalty


class LatentPenalty:
    """D_Z(Q_Z, P_Z) as a differentiable function of a batch of codes and an equally large prior sample.

    A penalty that trains a model of its own (WAE-GAN's latent critic) sets ``critic`` and ``critic_lr`` and
    implements :meth:`critic_loss`; the trainer gives that critic an optimizer of its own at ``critic_lr`` (on the
    auto-encoder's schedule) and its step, and tells the penalty, through :meth:`use_critic`, where to read the
    trained critic's parameters (they may be wrapped or sharded for distribution).
    """

    name = "penalty"
    critic: nn.Module | None = None
    critic_lr: float | None = None
    reencode = False  # the critic's step sees the codes encoded again after the auto-encoder's step

    def __call__(self, codes: LatentCodes, z_prior: Tensor, noise: StepNoise | None = None) -> Tensor:
        """D_Z on this batch; a penalty that draws random numbers takes them from ``noise`` (a training step's,
        the same for a sample at any world size) where given."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the person starting a run."""
        return self.name

    def use_critic(self, parameters: Parameters) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no critic")

    def critic_loss(self, critic: nn.Module, z_q: Tensor, z_p: Tensor) -> Tensor:
        """The critic's own loss, through ``critic`` (this penalty's critic, possibly wrapped for distribution)."""
        raise NotImplementedError(f"{type(self).__name__} has no critic")
