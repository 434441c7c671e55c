"""Where the random numbers of a training step come from.

A step draws per sample (the prior sample paired with each code, the encoder's noise, noise on the encoder's input,
a Gaussian decoder's noise) and per step (the sliced penalty's directions). With a :class:`StepNoise` each draw is
a function of (seed, step, what is drawn, the sample's index in the global batch): the whole global batch's draws
come from one generator and each process keeps the rows of its own samples, so a sample gets the same numbers on
any rank at any world size and micro-batch split. The cost is drawing the global batch's numbers on every process,
small beside the step itself. Without one (``None``), the process's own torch generator is used, as evaluation and
the tests of the math do.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vegan_scale.seeds import mix_seed

KEYS = ("prior", "encoder", "input", "decoder", "directions")  # what a step draws; each has its own stream
TRUNCATION = 2.0  # truncated normal draws lie within this many deviations


@dataclass(frozen=True)
class StepNoise:
    """The draws of one micro-batch: global-batch samples ``rows`` of step ``step``."""

    seed: int
    step: int
    rows: range  # the global indices of this micro-batch's samples
    global_rows: int  # the global batch

    def per_sample(self, key: str, shape: tuple[int, ...], like: Tensor, draw: Callable[..., Tensor]) -> Tensor:
        """Draws [len(rows), *shape] for this micro-batch's samples (``draw``: torch.randn or torch.rand)."""
        full = draw((self.global_rows, *shape), generator=self._generator(key, like), device=like.device,
                    dtype=like.dtype)  # fmt: skip
        return full[self.rows.start : self.rows.stop]

    def shared(self, key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """Standard normal draws of ``shape`` for the whole step: the same on every process."""
        return torch.randn(shape, generator=self._generator(key, like), device=like.device, dtype=like.dtype)

    @torch.compiler.disable  # seeding is host work on Python integers (train.compile would trace NumPy's mixing)
    def _generator(self, key: str, like: Tensor) -> torch.Generator:
        return torch.Generator(like.device).manual_seed(mix_seed(self.seed, self.step, KEYS.index(key)))


def normal(
    noise: StepNoise | None, key: str, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Standard normal draws of ``shape`` (samples first), on ``like``'s device and dtype: from ``generator`` when
    one is given, else from ``noise``, else from torch's own generator."""
    return _draw(torch.randn, noise, key, shape, like, generator)


def uniform(
    noise: StepNoise | None, key: str, shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform draws on [0, 1) of ``shape`` (samples first), as :func:`normal` chooses their source."""
    return _draw(torch.rand, noise, key, shape, like, generator)


def _draw(
    draw: Callable[..., Tensor],
    noise: StepNoise | None,
    key: str,
    shape: tuple[int, ...],
    like: Tensor,
    generator: torch.Generator | None,
) -> Tensor:
    if noise is None or generator is not None:
        return draw(shape, device=like.device, dtype=like.dtype, generator=generator)
    return noise.per_sample(key, shape[1:], like, draw)


def truncated_normal(noise: StepNoise | None, key: str, like: Tensor, std: float) -> Tensor:
    """Normal noise shaped like ``like`` with deviation ``std``, truncated at TRUNCATION deviations (by the inverse
    of the normal distribution function on uniform draws, as torch's trunc_normal_)."""
    edge = math.erf(TRUNCATION / math.sqrt(2))  # erfinv(+-edge) = +-TRUNCATION / sqrt(2)
    u = _draw(_uniform_on(-edge, edge), noise, key, tuple(like.shape), like, None)
    return u.erfinv_().mul_(std * math.sqrt(2))  # a new tensor, worked on in place (an input's size, every step)


def _uniform_on(low: float, high: float) -> Callable[..., Tensor]:
    """torch.rand's signature for uniform draws on [low, high): one pass, where rand and an affine map take three."""

    def draw(
        shape: tuple[int, ...], *, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        return torch.empty(shape, device=device, dtype=dtype).uniform_(low, high, generator=generator)

    return draw
