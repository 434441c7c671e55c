"""Image grids of samples, reconstructions and latent interpolations, as PIL images (no plotting library).

Used by the periodic evaluation of training and by ``vegan-scale sample`` (:func:`write_figures`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from vegan_scale import atomic
from vegan_scale.errors import ConfigError
from vegan_scale.models.autoencoder import AutoEncoder

MAX_GRID = 100  # rows of a grid: 10,000 images decoded at once (eval.grid_size has the same bound)


def image_grid(images: Tensor, columns: int, pad: int = 2) -> Image.Image:
    """Images [N, C, H, W] in [0, 1] tiled row by row, ``columns`` per row, on a white background."""
    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, dtype=np.uint8)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        canvas[top : top + h, left : left + w] = pixels[i]
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def side_by_side(originals: Tensor, reconstructions: Tensor) -> Tensor:
    """Interleave originals and reconstructions so that each original sits left of its reconstruction."""
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)


@torch.no_grad()
def interpolations(model: AutoEncoder, images: Tensor, steps: int) -> Tensor:
    """Decoded points on straight lines in latent space, ``steps`` per line with both ends, line after line: line i
    runs from the code of ``images[i]`` to that of ``images[pairs + i]`` (``pairs = len(images) // 2``).

    A decoder that learned a smooth latent space shows one image turning into the other; holes in Q_Z that the
    prior covers show up as off-manifold images midway.
    """
    pairs = len(images) // 2
    z = model.encode(model.to_model(images[: 2 * pairs])).z
    t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype).view(1, steps, 1)
    path = z[:pairs, None] + t * (z[pairs:, None] - z[:pairs, None])
    return model.to_images(model.decode(path.flatten(0, 1)).mean.float())


@torch.no_grad()
def figures(
    model: AutoEncoder, prior_codes: Tensor, originals: Tensor, ends: Tensor, grid: int
) -> dict[str, Image.Image]:
    """The three grids, ``grid`` columns wide, by the name each is saved and logged under: ``samples`` (the prior
    codes decoded), ``reconstructions`` (each of ``originals``, floats in [0, 1], left of its reconstruction) and
    ``interpolations`` (lines between the codes of pairs of ``ends``). The model's mode is left as it is."""
    dtype = next(model.parameters()).dtype
    decoded = model.to_images(model.decode(prior_codes.to(dtype)).mean.float())
    reconstructed = model.to_images(model(model.to_model(originals).to(dtype)).recon.mean.float())
    return {
        "samples": image_grid(decoded, grid),
        "reconstructions": image_grid(side_by_side(originals, reconstructed), grid),
        "interpolations": image_grid(interpolations(model, ends.to(dtype), grid), grid),
    }


def test_images_needed(grid: int) -> int:
    """Test images :func:`write_figures` uses: half a grid of reconstructions, then 2 * grid interpolation ends."""
    if not 1 <= grid <= MAX_GRID:
        raise ConfigError(f"a grid has 1 to {MAX_GRID} rows and columns, not {grid}")
    return grid * grid // 2 + 2 * grid


def write_figures(model: AutoEncoder, images: Tensor, out: Path, grid: int, seed: int = 0) -> list[Path]:
    """samples.png (grid x grid decoded prior draws), reconstructions.png and interpolations.png (grid lines of grid
    steps) in ``out``; ``images`` are floats in [0, 1], at least :func:`test_images_needed` of them, the first
    half grid reconstructed and the next 2 * grid interpolated between."""
    if len(images) < test_images_needed(grid):
        raise ConfigError(f"a {grid}x{grid} grid needs {test_images_needed(grid)} test images, got {len(images)}")
    device = next(model.parameters()).device
    codes = model.prior.sample(grid * grid, generator=torch.Generator().manual_seed(seed)).to(device)
    torch.manual_seed(seed)  # the noise of Gaussian or implicit encoders
    images, half = images.to(device), grid * grid // 2
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in figures(model, codes, images[:half], images[half : half + 2 * grid], grid).items():
        paths.append(out / f"{name}.png")
        save(image, paths[-1])
    return paths


def save(image: Image.Image, path: Path) -> None:
    """``image`` as the PNG file ``path``, whole or not at all (a full disk, a stop signal while it is written), in
    place of a link or a pipe rather than through it; an error names the file."""
    with atomic.writing(path) as tmp, atomic.naming(path):
        image.save(tmp, format="PNG")
