"""The figures of ``vegan-scale sample``: prior samples, test reconstructions and latent interpolations."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from vegan_scale.engine.figures import image_grid, interpolations, side_by_side
from vegan_scale.models.autoencoder import AutoEncoder


def test_images_needed(grid: int) -> int:
    """Test images the figures use: half a grid of reconstructions, then 2 * grid interpolation ends."""
    return grid * grid // 2 + 2 * grid


@torch.no_grad()
def write_figures(model: AutoEncoder, images: Tensor, out: Path, grid: int, seed: int = 0) -> list[Path]:
    """samples.png (grid x grid decoded prior draws), reconstructions.png (each test image left of its
    reconstruction) and interpolations.png (grid lines of grid steps between the codes of two test images) in
    ``out``; ``images`` are floats in [0, 1], at least :func:`test_images_needed` of them."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the noise of Gaussian or implicit encoders
    images = images.to(device)
    half = grid * grid // 2
    figures = {
        "samples": model.decode(model.prior.sample(grid * grid, generator=generator).to(device)).mean,
        "reconstructions": side_by_side(images[:half], model.reconstruct(images[:half])),
        "interpolations": interpolations(model, images[half : half + 2 * grid], grid),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, tiles in figures.items():
        paths.append(out / f"{name}.png")
        image_grid(tiles, grid).save(paths[-1])
    return paths
