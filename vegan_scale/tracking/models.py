"""A run's trained auto-encoder as an MLflow model: logged, registered, and downloaded again.

The model is MLflow's own pyfunc flavour, logged as the run's model ``model`` (an MLflow 3 logged model linked to
the run), so ``mlflow.pyfunc.load_model("runs:/<run_id>/model")`` works and the UI lists it under the run. It is a
model from code (:mod:`vegan_scale.tracking.pyfunc_model`): nothing is pickled. Its artifacts are the run's export
directory (safetensors weights + the plain-data ``model.yaml``), which :func:`downloaded_export` hands to
:func:`vegan_scale.load`, and the run's resolved ``config.yaml``; the settings the run used are also the logged
model's params, so the MLflow UI shows them on the model's page. Only public MlflowClient calls are used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vegan_scale import export, provenance
from vegan_scale.config.yaml_file import read_yaml
from vegan_scale.errors import ConfigError
from vegan_scale.tracking.mlflow_run import unanswered

MODEL_NAME = "model"
CODE = Path(__file__).with_name("pyfunc_model.py")
ARTIFACT = "export"  # the export directory, among the pyfunc model's artifacts
CONFIG_ARTIFACT = "config"  # the run's resolved config.yaml
WEIGHTS_TAG = "vegan_scale.weights_sha256"  # which export a logged model holds


def save_pyfunc(export_dir: Path, config_file: Path, path: Path) -> Path:
    """The pyfunc model of an export directory and its run's resolved configuration, saved locally at ``path``
    (with its signature and requirements)."""
    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    data = export.read_sections(export_dir)["data"]
    images = (-1, data["channels"], data["image_size"], data["image_size"])
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), images)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), images)]),
        params=ParamSchema([ParamSpec("output", "string", "reconstruction")]),
    )
    import torch

    with warnings.catch_warnings():  # MLflow warns, on the console of every run, that no input example was given:
        # the signature is explicit, and an example would have MLflow load and run the model at every logging
        warnings.filterwarnings("ignore", message=".*An input example was not provided")  # after colour codes
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(CODE),
            artifacts={ARTIFACT: str(export_dir), CONFIG_ARTIFACT: str(config_file)},
            signature=signature,
            pip_requirements=[f"vegan-scale=={provenance.version()}", f"torch=={torch.__version__.split('+')[0]}"],
        )
    return path


def log_model(
    client: Any,
    run_id: str,
    export_dir: Path,
    config_file: Path,
    params: dict[str, str],
    step: int,
    register_as: str | None,
) -> str:
    """Log an export (with the run's ``config_file`` and the ``params`` it used) as the run's model ``model`` and,
    with ``register_as``, as a version of that registered model; returns the logged model's id. Idempotent: a
    retry, or ``vegan-scale sync``, reuses the run's newest model (the one ``runs:/<run_id>/model`` resolves to),
    uploads nothing when it already holds these weights, and registers it once. A finished model is never changed,
    since registered versions point at its files: a run continued and exported again logs a new model, which
    ``runs:/<run_id>/model`` then resolves to."""
    from mlflow.entities import LoggedModelOutput

    weights = hashlib.sha256((export_dir / export.MODEL_FILE).read_bytes()).hexdigest()
    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    model = _run_model(client, experiment_id, run_id)
    finished = model is not None and model.status == "READY"
    if model is None or (finished and model.tags.get(WEIGHTS_TAG) != weights):  # a finished model is never changed
        model = client.create_logged_model(
            experiment_id, name=MODEL_NAME, source_run_id=run_id, params=params, model_type="vegan_scale.AutoEncoder"
        )
        finished = False
    if not finished:  # a new model, or one whose upload an earlier attempt did not finish
        with tempfile.TemporaryDirectory(prefix="vegan-scale-pyfunc-") as tmp:
            local = save_pyfunc(export_dir, config_file, Path(tmp) / MODEL_NAME)
            client.log_model_artifacts(model.model_id, str(local))
        client.set_logged_model_tags(model.model_id, {WEIGHTS_TAG: weights})
        client.finalize_logged_model(model.model_id, "READY")
    if not any(out.model_id == model.model_id for out in (run.outputs.model_outputs if run.outputs else [])):
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])  # one link per run and model
    if register_as:
        register(client, register_as, run_id, model)
    return model.model_id


def _run_model(client: Any, experiment_id: str, run_id: str) -> Any | None:
    """The run's newest logged model named ``model``, if it has one: the one ``runs:/<run_id>/model`` resolves to
    (MLflow takes the first of the same search, newest first)."""
    page_token = None
    while True:
        page = client.search_logged_models(
            [experiment_id], filter_string=f"name = '{MODEL_NAME}'", page_token=page_token
        )
        for model in page:
            if model.source_run_id == run_id:
                return model
        if not page.token:
            return None
        page_token = page.token


def register(client: Any, name: str, run_id: str, model: Any) -> None:
    """A version of registered model ``name`` (created when missing) pointing at a logged model, unless one does
    already (a retry). Its source is the model's artifact location, not ``models:/<model_id>``: a local store would
    resolve that through the process's global tracking URI rather than this client's."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if any(v.source == model.artifact_location for v in client.search_model_versions(f"name = '{name}'")):
        return  # (the stores keep no model id in a version: its source names the model)
    client.create_model_version(name, source=model.artifact_location, run_id=run_id, model_id=model.model_id)


@contextlib.contextmanager
def downloaded_export(uri: str, tracking_uri: str | None) -> Iterator[Path]:
    """The export directory inside the MLflow model at ``uri`` (``runs:/<run_id>/model``,
    ``models:/<name>/<version>``), downloaded to a temporary directory that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="vegan-scale-model-") as tmp:
        yield _download(uri, tracking_uri, Path(tmp))


def _files_of(uri: str, tracking_uri: str | None) -> str:
    """Where the files of the model at ``uri`` are, looked up in the store at ``tracking_uri``: MLflow's download
    resolves ``models:/NAME/VERSION`` (``@ALIAS``, ``/STAGE``) and ``runs:/RUN/model`` through the process's store
    ($MLFLOW_TRACKING_URI) whatever tracking URI it is given. Any other URI, or without ``tracking_uri``, as it is."""
    if tracking_uri is None or not uri.startswith(("models:/", "runs:/")):
        return uri
    from mlflow.store.artifact.utils.models import get_model_name_and_version
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    if uri.startswith("models:/"):
        return client.get_model_version_download_uri(*get_model_name_and_version(client, uri))
    run_id, _, name = uri.removeprefix("runs:/").partition("/")
    model = _run_model(client, client.get_run(run_id).info.experiment_id, run_id) if name == MODEL_NAME else None
    return model.artifact_location if model is not None else uri


def _check_store(uri: str, store: str | None) -> None:
    """Refuse, at once, a store that cannot hold the model: a server that does not answer (MLflow's client would
    retry for minutes, by default seven times 120 s), a sqlite file that does not exist (MLflow would create it)."""
    problem = unanswered(store) if store else None
    database = store.removeprefix("sqlite:///") if store and store.startswith("sqlite:///") else None
    if database is not None and not Path(database).is_file():
        problem = f"there is no MLflow store at {database}"
    if problem is not None:
        raise ConfigError(
            f"cannot download the model {uri}: {problem}; check the tracking URI (tracking_uri=... or "
            "$MLFLOW_TRACKING_URI) and that its server is running"
        )


def _download(uri: str, tracking_uri: str | None, into: Path) -> Path:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    where = tracking_uri or "the tracking URI in $MLFLOW_TRACKING_URI (or MLflow's default)"
    _check_store(uri, tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        source = _files_of(uri, tracking_uri)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(into), tracking_uri=tracking_uri)
        )
    except (MlflowException, OSError, ImportError) as e:  # ImportError: the database driver of the store's URI
        raise ConfigError(
            f"cannot download the model {uri} from {where}: {str(e).splitlines()[0][:300]}; check the run id (or "
            "the registered name and version) and the tracking URI (tracking_uri=... or $MLFLOW_TRACKING_URI)"
        ) from None
    try:
        flavour = read_yaml(local / "MLmodel")["flavors"]["python_function"]
        return local / flavour["artifacts"][ARTIFACT]["path"]
    except (OSError, KeyError, TypeError, ConfigError):
        raise ConfigError(
            f"{uri} is not a vegan_scale model (its MLmodel has no pyfunc artifact {ARTIFACT!r}): log models with "
            "vegan-scale train (tracking.backend=mlflow) or `vegan-scale sync`"
        ) from None
