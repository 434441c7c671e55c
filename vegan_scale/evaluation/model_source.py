"""What to evaluate: a model and the run it came from, found from a run directory, a checkpoint or an export.

* a run directory: its ``export/`` (the final model), unless it has none, or none whole (interrupted between its
  two files), or a checkpoint newer than it (a continuation training on past its previous attempt's export), else
  its newest complete checkpoint;
  ``config.yaml`` holds the run's full configuration (cost, kernel, test data, tracking);
* a checkpoint directory (``…/checkpoints/step_N``): its ``autoencoder.safetensors`` (written in every mode,
  consolidated under DeepSpeed) and ``config.yaml``; its run directory is two levels up;
* an export directory (``model.safetensors`` + ``model.yaml``): the network only; when it is a run's ``export/``,
  the run's configuration is used too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vegan_scale import checkpoint, export
from vegan_scale.data.images import load_images
from vegan_scale.data.index import read_index
from vegan_scale.errors import ConfigError
from vegan_scale.experiment import image_shape, load_stored_experiment, read_retry, stall_timeout_s
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.registry import export_experiment, load_model
from vegan_scale.rundir import RunDir, is_complete, named_step


@dataclass
class ModelSource:
    model: AutoEncoder  # in evaluation mode
    config: Any  # the run's full configuration; for a bare export, the schema defaults under its model.yaml
    run_dir: Path | None  # where eval.json goes and whose MLflow run gets the metrics; None for a bare export
    step: int | None  # the training step the weights are from, when known
    weights: Path  # the weight file read

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return image_shape(self.config)

    def test_images(self, limit: int, test_data: str | None = None) -> torch.Tensor:
        """The first ``limit`` images (uint8 [N, C, H, W]) of the run's test shards, or of ``test_data``; a read
        that stops returning samples is an error after the run's stall timeout, as in training."""
        index = read_index(test_data or self.config.data.test)
        retry, stall = read_retry(self.config), stall_timeout_s(self.config)
        return load_images(index, self.image_shape, limit, retry, stall_timeout_s=stall)[0]


@dataclass(frozen=True)
class _Checkpoint:
    """What evaluation needs of a checkpoint, read at once: a run that trains on may delete it a moment later."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    config: Any  # read last: once its file is read, checking it takes long and needs no file


def read_checkpoint(path: Path) -> _Checkpoint:
    """The auto-encoder's weights, step and configuration of a complete checkpoint, the files read checked against
    its state.json as a resume checks them (an export written from damaged weights would carry a valid digest)."""
    if not is_complete(path):
        raise ConfigError(f"{path} is not a complete checkpoint directory (…/checkpoints/step_N with COMPLETE)")
    config_file = path / checkpoint.CONFIG
    if not config_file.exists():  # checkpoints of early versions hold no config.yaml: the run's is the same
        run_dir = RunDir.containing(path)
        if run_dir is None:
            raise ConfigError(f"checkpoint {path} has no {checkpoint.CONFIG} and no run directory above it")
        config_file = run_dir.config
    step = checkpoint.verify(path, (checkpoint.module_file(path).name, checkpoint.CONFIG))["step"]
    weights = checkpoint.read_module(path, checkpoint.AUTOENCODER)
    return _Checkpoint(path, step, weights, load_stored_experiment(config_file))


def _from_checkpoint(read: _Checkpoint, device: torch.device | str) -> ModelSource:
    run_dir = RunDir.containing(read.path)
    weights = checkpoint.module_file(read.path)
    model = load_model(read.config, read.weights, device, name=str(weights))
    return ModelSource(model, read.config, run_dir.path if run_dir else None, read.step, weights)


def _from_export(path: Path, device: torch.device | str) -> ModelSource:
    run_dir = RunDir(path.parent) if RunDir(path.parent).is_run() else None
    network = export_experiment(path)  # the network its model.yaml describes, checked against its weights' digest
    config = load_stored_experiment(run_dir.config) if run_dir else network
    sections = [export.model_sections(dataclasses.asdict(c)) for c in (network, config)]
    if diffs := export.differences(*sections):  # the run's configuration says the rest (cost, test data, tracking)
        raise ConfigError(
            f"{run_dir.config if run_dir else path} describes another network than the export {path} (edited "
            f"since the run, or the export copied in): {'; '.join(diffs)}; evaluate the export alone with "
            f"`vegan-scale eval {path} --test-data DIR`"
        )
    step = export.step_of(path)
    if step is None and run_dir is not None and run_dir.newest_checkpoint() is not None:  # an export of old
        step = run_dir.read_newest(lambda newest: checkpoint.read_state(newest)["step"])
    run_path = run_dir.path if run_dir else None
    weights = path / export.MODEL_FILE
    return ModelSource(load_model(network, weights, device), config, run_path, step, weights)


def _newer_checkpoint(run_dir: RunDir) -> bool:
    """Whether the run holds a checkpoint newer than its export: a continuation that trains on (or was stopped)
    past the step of its previous attempt's export, whose model is then not the run's latest."""
    newest, step = run_dir.newest_checkpoint(), export.step_of(run_dir.export)
    return newest is not None and step is not None and (named_step(newest) or 0) > step


def open_model(path: Path, device: torch.device | str = "cpu") -> ModelSource:
    """The model at ``path`` (run directory, checkpoint or export) with its configuration; ConfigError otherwise."""
    path = Path(path)
    if is_complete(path):
        return _from_checkpoint(read_checkpoint(path), device)
    if (path / export.MODEL_FILE).exists():
        export.check_is_export(path)  # weights without their model.yaml: an export interrupted
        return _from_export(path, device)
    run_dir = RunDir(path)
    if run_dir.is_run():
        if export.is_export(run_dir.export) and not _newer_checkpoint(run_dir):
            return _from_export(run_dir.export, device)
        return _from_checkpoint(run_dir.read_newest(read_checkpoint), device)
    raise ConfigError(
        f"{path} is neither a run directory (config.yaml), a checkpoint (…/checkpoints/step_N with "
        f"COMPLETE) nor an exported model ({export.MODEL_FILE} + {export.CONFIG_FILE})"
    )
