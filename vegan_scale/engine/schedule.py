"""How long a run is, in optimizer steps, and the learning-rate schedule of the WAE recipes along it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Steps:
    start: int  # the step a continued run starts after (0 for a new run)
    total: int  # the step the run ends at
    per_epoch: float  # optimizer steps per pass over the data

    @classmethod
    def count(
        cls, start: int, epochs: float, micro_batches_per_epoch: int, accumulation: int, max_steps: int | None
    ) -> Steps:
        """``epochs`` passes, or ``max_steps`` steps if that comes first."""
        per_epoch = micro_batches_per_epoch / accumulation
        total = math.ceil(epochs * per_epoch)
        return cls(start, total if max_steps is None else min(total, max_steps), per_epoch)


def lr_factor(epoch: float, milestones: list[float], factors: list[float]) -> float:
    """The factor in effect at ``epoch``: 1 before the first milestone, then the factor of the latest one passed."""
    factor = 1.0
    for milestone, f in zip(milestones, factors, strict=True):
        if epoch >= milestone:
            factor = f
    return factor
