"""Named outputs of the encoder and decoder, so that losses read ``codes.z`` rather than ``out[1]``.

They are named tuples rather than dataclasses because distributed wrappers walk module outputs to attach their
hooks and know tuples, not dataclasses: DeepSpeed ZeRO-3 fails in backward on a module returning a dataclass.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from vegan_scale.noise import StepNoise, normal


class LatentCodes(NamedTuple):
    """Z ~ Q(Z|X) for a batch. ``mean``/``logvar`` are set by Gaussian encoders only (the KL penalty needs them)."""

    z: Tensor
    mean: Tensor | None = None
    logvar: Tensor | None = None


class Reconstruction(NamedTuple):
    """G(Z) for a batch, kept as logits so that the Bernoulli cost stays numerically stable.

    ``logvar`` is the log-variance of a Gaussian decoder (None for a deterministic one); the image is
    ``sigmoid(logits)`` in [0, 1], or ``tanh(logits)`` in [-1, 1] for ``symmetric`` data (the official CelebA
    recipes' ``input_normalize_sym``), plus, for the Gaussian decoder, noise of that variance.
    """

    logits: Tensor
    logvar: Tensor | None = None
    symmetric: bool = False

    @property
    def mean(self) -> Tensor:
        """The decoder's mean image, in the data's range."""
        return torch.tanh(self.logits) if self.symmetric else torch.sigmoid(self.logits)

    def sample(self, noise: StepNoise | None = None) -> Tensor:
        """A reparameterised draw of the decoded image: the mean, plus Gaussian noise for a Gaussian decoder (from
        ``noise``, a training step's, or torch's generator)."""
        if self.logvar is None:
            return self.mean
        return self.mean + normal(noise, "decoder", tuple(self.logits.shape), self.logits) * torch.exp(
            0.5 * self.logvar
        )
