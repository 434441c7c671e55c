"""The Python API: train an experiment, and load an exported model without DeepSpeed, accelerate or a config file."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vegan_scale.errors import ConfigError, storage_error
from vegan_scale.experiment import ExperimentConfig, load_experiment
from vegan_scale.models.autoencoder import AutoEncoder
from vegan_scale.registry import load_export

MODEL_URI_SCHEMES = ("runs:/", "models:/")


def train(
    config: str | Path | Mapping[str, Any] | ExperimentConfig, overrides: Sequence[str] = (), stops: Any = None
) -> Path:
    """Train an experiment, as ``vegan-scale train CONFIG [overrides]`` does, and return its run directory.

    ``config`` is an experiment file, the experiment as nested dicts (``inherit`` included) or one already loaded
    (:func:`vegan_scale.experiment.load_experiment`), checked again as a whole: a value set on it after loading
    passes the same checks as one in a file. ``overrides`` are ``key.sub=value`` items applied last. Under
    ``accelerate launch`` every process calls it. Errors are :class:`vegan_scale.errors.VeganError` subclasses whose
    ``exit_code`` is the CLI's. The process group is ended afterwards, so a script may train again. ``stops``: a
    :class:`vegan_scale.stops.StopRequests` already collecting this process's stop requests (the CLI's); by default
    training collects them while it runs.
    """
    # imported here: the engine brings accelerate and the data pipeline, which loading a model does not need
    from vegan_scale.distributed.accelerator import shutdown
    from vegan_scale.engine.loop import train as train_loop

    if isinstance(config, ExperimentConfig):
        config = dataclasses.asdict(config)
    cfg = load_experiment(config, overrides)
    try:
        return train_loop(cfg, stops)
    except OSError as e:  # as the CLI says them: storage (exit 74), else a path that cannot be used (exit 2)
        if (storage := storage_error(e)) is not None:
            raise storage from e
        if e.filename is None:
            raise
        raise ConfigError(f"{e.filename}: {e.strerror}") from e
    finally:
        shutdown()


def load(source: str | Path, device: str = "cpu", tracking_uri: str | None = None) -> AutoEncoder:
    """The auto-encoder exported in ``source``, in evaluation mode, with ``encode``, ``decode``, ``reconstruct`` and
    ``sample(n)``. ``source`` is an export directory (a run's ``export/`` or ``vegan-scale export``'s output) or an
    MLflow model URI: ``runs:/<run_id>/model`` or ``models:/<name>/<version>`` (downloaded from ``tracking_uri``,
    else $MLFLOW_TRACKING_URI). Nothing in the files is executed or interpolated, and the weights' shapes are
    checked before the network is built."""
    if not isinstance(source, str | Path):
        raise ConfigError(
            f"source must be an export directory or an MLflow model URI (runs:/, models:/), got {source!r}"
        )
    device = _usable(device)
    if str(source).startswith(MODEL_URI_SCHEMES):
        from vegan_scale.tracking.models import downloaded_export  # MLflow only when asked for

        with downloaded_export(str(source), tracking_uri) as directory:  # read whole, then removed
            return load_export(directory, device)
    return load_export(source, device)


def _usable(device: str | torch.device) -> torch.device:
    """``device``, refused at once by name where it cannot hold the model here (a CUDA device on a machine without
    one, a misspelt name), rather than by torch after the weights were read."""
    try:
        device = torch.device(device)
        if device.type == "meta":
            raise RuntimeError("the meta device holds no values")
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError, ImportError) as e:  # "not compiled with CUDA" is an assertion,
        # and a device whose backend torch imports on first use (hpu) a missing module
        why = str(e).splitlines()[0][:200]
        raise ConfigError(f"device {str(device)!r} cannot be used here ({why}); use 'cpu'") from None
    return device
