"""What to evaluate: a model and the run it came from, found from a run directory, a checkpoint or an export.

* a run directory: its ``export/`` (the final model), else its newest complete checkpoint; ``config.yaml`` holds
  the run's full configuration (cost, kernel, test data, tracking);
* a checkpoint directory (``…/checkpoints/step_N``): its ``autoencoder.safetensors`` (written in every mode,
  consolidated under DeepSpeed) and ``config.yaml``; its run directory is two levels up;
* an export directory (``model.safetensors`` + ``model.yaml``): the network only; when it is a run's ``export/``,
  the run's configuration is used too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vegan_scale import checkpoint, export
from vegan_scale.config.load import load_config
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import load_images
from vegan_scale.errors import ConfigError
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.registry import ExperimentConfig, build_model

RUN_CONFIG = "config.yaml"
EXPORT_DIR = "export"


@dataclass
class ModelSource:
    model: AutoEncoder  # in evaluation mode
    config: Any  # the run's full configuration; for a bare export, the schema defaults under its model.yaml
    run_dir: Path | None  # where eval.json goes and whose MLflow run gets the metrics; None for a bare export
    step: int | None  # the training step the weights are from, when known
    weights: Path  # the weight file read

    @property
    def image_shape(self) -> tuple[int, int, int]:
        d = self.config.data
        return d.channels, d.image_size, d.image_size

    def test_images(self, limit: int, test_data: str | None = None) -> torch.Tensor:
        """The first ``limit`` images (uint8 [N, C, H, W]) of the run's test shards, or of ``test_data``."""
        return load_images(read_index(test_data or self.config.data.test), self.image_shape, limit)[0]


def _newest_step(run_dir: Path) -> int | None:
    saved = checkpoint.complete_checkpoints(run_dir / "checkpoints")
    return checkpoint.read_state(saved[-1])["step"] if saved else None


def _build(config: Any, weights: dict[str, torch.Tensor], device: torch.device | str) -> AutoEncoder:
    model = build_model(config)
    model.load_state_dict(weights)
    return model.to(device).eval()


def open_model(path: Path, device: torch.device | str = "cpu") -> ModelSource:
    """The model at ``path`` (run directory, checkpoint or export) with its configuration; ConfigError otherwise."""
    path = Path(path)
    if (path / checkpoint.COMPLETE).exists():
        run_dir = path.parent.parent if (path.parent.parent / RUN_CONFIG).exists() else None
        if not (path / checkpoint.CONFIG).exists() and run_dir is None:
            raise ConfigError(f"checkpoint {path} has no {checkpoint.CONFIG} and no run directory above it")
        # checkpoints of early versions hold no config.yaml: the run's is the same configuration
        config = load_config(
            ExperimentConfig, path / checkpoint.CONFIG if (path / checkpoint.CONFIG).exists() else run_dir / RUN_CONFIG
        )
        weights = checkpoint.read_module(path, "autoencoder")
        step = checkpoint.read_state(path)["step"]
        return ModelSource(_build(config, weights, device), config, run_dir, step, path / "autoencoder.safetensors")
    if (path / export.MODEL_FILE).exists():
        run_dir = path.parent if (path.parent / RUN_CONFIG).exists() else None
        weights, model_yaml = export.read(path)
        config = load_config(ExperimentConfig, run_dir / RUN_CONFIG if run_dir else model_yaml)
        step = _newest_step(run_dir) if run_dir else None
        return ModelSource(_build(config, weights, device), config, run_dir, step, path / export.MODEL_FILE)
    if (path / RUN_CONFIG).exists():
        if (path / EXPORT_DIR / export.MODEL_FILE).exists():
            return open_model(path / EXPORT_DIR, device)
        saved = checkpoint.complete_checkpoints(path / "checkpoints")
        if saved:
            return open_model(saved[-1], device)
        raise ConfigError(f"run directory {path} holds neither an export/ nor a complete checkpoint yet")
    raise ConfigError(
        f"{path} is neither a run directory (config.yaml), a checkpoint (…/checkpoints/step_N with "
        f"{checkpoint.COMPLETE}) nor an exported model ({export.MODEL_FILE} + {export.CONFIG_FILE})"
    )
