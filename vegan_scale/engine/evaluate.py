"""Evaluation during training: test reconstruction error over every process's share, and the figures.

The full evaluation of a trained model (FID, KID, precision/recall, sharpness, latent MMD) is
``vegan_scale.evaluation``; this one is cheap enough to run every ``eval.every_steps``.

Every process evaluates its own share of the evaluation images and the sums are added across processes, so that
the whole set counts (not the main process's share) and ZeRO-3's collective forward passes run on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from vegan_scale.engine.figures import image_grid, interpolations, side_by_side
from vegan_scale.engine.objective import Cost
from vegan_scale.models.autoencoder import AutoEncoder


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: Image.Image
    reconstructions: Image.Image
    interpolations: Image.Image

    @property
    def figures(self) -> dict[str, Image.Image]:
        """Every figure by the key it is saved and logged under."""
        return {"samples": self.samples, "reconstructions": self.reconstructions, "interpolations": self.interpolations}


@torch.no_grad()
def evaluate(
    model: AutoEncoder,
    cost: Cost,
    images: torch.Tensor,
    originals: torch.Tensor,
    prior_noise: torch.Tensor,
    grid: int,
    batch_size: int,
    sum_over_processes: Callable[[torch.Tensor], torch.Tensor],
) -> Evaluation:
    """Metrics over ``images`` (this process's share; floats in [0, 1]) and every process, and the figures.

    ``prior_noise`` is a fixed prior sample, so that the sample grids of successive evaluations show the same
    codes decoded by an improving decoder.
    """
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    totals = torch.zeros(3, dtype=torch.float64, device=images.device)  # cost, squared error, count
    for chunk in images.split(batch_size):
        recon = model(chunk.to(dtype)).recon
        totals[0] += cost(chunk, recon).double().sum()
        totals[1] += (recon.mean.float() - chunk).pow(2).flatten(1).mean(dim=1).double().sum()
        totals[2] += len(chunk)
    totals = sum_over_processes(totals)
    pairs = side_by_side(originals, model(originals.to(dtype)).recon.mean.float())
    samples = model.decode(prior_noise.to(dtype)).mean.float()
    lines = interpolations(model, originals[: 2 * grid].to(dtype), grid)  # grid // 2 lines for grids under 4
    model.train(was_training)
    metrics = {"eval/recon": (totals[0] / totals[2]).item(), "eval/mse": (totals[1] / totals[2]).item()}
    return Evaluation(metrics, image_grid(samples, grid), image_grid(pairs, grid), image_grid(lines, grid))
