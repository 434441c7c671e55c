"""vegan_scale: penalized optimal-transport generative models (WAE-MMD, WAE-GAN, AAE, VAE, SWAE) at scale."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load"]


def load(directory: Any, device: str = "cpu") -> Any:
    """An exported auto-encoder, ready to ``encode``, ``decode``, ``reconstruct`` and ``sample``
    (see :func:`vegan_scale.api.load`; imported on use, so that ``import vegan_scale`` stays light)."""
    from vegan_scale.api import load as _load

    return _load(directory, device)
