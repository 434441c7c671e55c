"""The Python API: load an exported model and use it without DeepSpeed, accelerate or a configuration file."""

from __future__ import annotations

from pathlib import Path

from vegan_scale import export
from vegan_scale.config.load import load_config
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.registry import ExperimentConfig, build_model


def load(directory: str | Path, device: str = "cpu") -> AutoEncoder:
    """The auto-encoder exported in ``directory`` (a run's ``export/`` or ``vegan-scale export``'s output), in
    evaluation mode, with ``encode``, ``decode``, ``reconstruct`` and ``sample(n)``."""
    weights, config_path = export.read(Path(directory))
    model = build_model(load_config(ExperimentConfig, config_path))
    model.load_state_dict(weights)
    return model.to(device).eval()
