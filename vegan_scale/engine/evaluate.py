"""Evaluation during training: test reconstruction error and the sample and reconstruction grids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from vegan_scale.engine.figures import image_grid, side_by_side
from vegan_scale.engine.objective import Cost
from vegan_scale.models.autoencoder import AutoEncoder


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: Image.Image
    reconstructions: Image.Image


@torch.no_grad()
def evaluate(
    model: AutoEncoder, cost: Cost, images: torch.Tensor, prior_noise: torch.Tensor, grid: int, batch_size: int
) -> Evaluation:
    """Metrics on ``images`` (float, [0, 1], on the model's device) and the two figures.

    ``prior_noise`` is a fixed prior sample, so that the sample grids of successive evaluations show the same
    codes decoded by an improving decoder.
    """
    was_training = model.training
    model.eval()
    cost_sum = mse_sum = 0.0
    for chunk in images.split(batch_size):
        out = model(chunk)
        cost_sum += cost(chunk, out.recon).sum().item()
        mse_sum += (out.recon.mean - chunk).pow(2).flatten(1).mean(dim=1).sum().item()
    half = grid * grid // 2
    originals = images[:half]
    pairs = side_by_side(originals, model(originals).recon.mean)
    samples = model.decode(prior_noise).mean
    model.train(was_training)
    n = len(images)
    return Evaluation(
        {"eval/recon": cost_sum / n, "eval/mse": mse_sum / n},
        image_grid(samples, grid),
        image_grid(pairs, grid),
    )
