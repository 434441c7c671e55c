"""The learning-rate schedule of the WAE recipes: piecewise constant in epochs, as a factor of the base rate."""

from __future__ import annotations


def lr_factor(epoch: float, milestones: list[float], factors: list[float]) -> float:
    """The factor in effect at ``epoch``: 1 before the first milestone, then the factor of the latest one passed."""
    factor = 1.0
    for milestone, f in zip(milestones, factors, strict=True):
        if epoch >= milestone:
            factor = f
    return factor
