"""Image grids for samples, reconstructions and latent interpolations, as PIL images (no plotting library)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_grid(images: torch.Tensor, columns: int, pad: int = 2) -> Image.Image:
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


def side_by_side(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Interleave originals and reconstructions so that each original sits left of its reconstruction."""
    return torch.stack([originals, reconstructions], dim=1).flatten(0, 1)


@torch.no_grad()
def interpolations(model: torch.nn.Module, images: torch.Tensor, steps: int) -> torch.Tensor:
    """Decoded points on straight lines in latent space, ``steps`` per line with both ends, line after line: line i
    runs from the code of ``images[i]`` to that of ``images[pairs + i]`` (``pairs = len(images) // 2``).

    A decoder that learned a smooth latent space shows one image turning into the other; holes in Q_Z that the
    prior covers show up as off-manifold images midway.
    """
    pairs = len(images) // 2
    z = model.encode(images[: 2 * pairs]).z
    t = torch.linspace(0, 1, steps, device=z.device, dtype=z.dtype).view(1, steps, 1)
    path = z[:pairs, None] + t * (z[pairs:, None] - z[:pairs, None])
    return model.decode(path.flatten(0, 1)).mean.float()
