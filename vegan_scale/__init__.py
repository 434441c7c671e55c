"""vegan_scale: penalized optimal-transport generative models (WAE-MMD, WAE-GAN, AAE, VAE, SWAE) at scale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from vegan_scale.provenance import version

__version__ = version()
__all__ = ["load", "train"]

# The functions below import their implementation on use, so that `import vegan_scale` stays light.


def train(config: str | Path | Mapping[str, Any] | Any, overrides: Sequence[str] = (), stops: Any = None) -> Path:
    """Train an experiment (a YAML file, nested dicts or one loaded, then ``key.sub=value`` overrides) and return its
    run directory (see :func:`vegan_scale.api.train`)."""
    from vegan_scale.api import train as _train

    return _train(config, overrides, stops)


def load(source: Any, device: str = "cpu", tracking_uri: str | None = None) -> Any:
    """An exported auto-encoder (a directory, ``runs:/<run_id>/model`` or ``models:/<name>/<version>``), ready to
    ``encode``, ``decode``, ``reconstruct`` and ``sample`` (see :func:`vegan_scale.api.load`)."""
    from vegan_scale.api import load as _load

    return _load(source, device, tracking_uri)
