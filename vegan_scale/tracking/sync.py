"""A run directory's MLflow run brought up to date after training: ``vegan-scale sync`` (everything the store
lacks, the run created when the server never saw it) and ``vegan-scale eval``'s results."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vegan_scale import export
from vegan_scale.atomic import unwritable
from vegan_scale.errors import ConfigError, DataError, RunDirInUseError, StorageError, TrackingError
from vegan_scale.rundir import RunDir
from vegan_scale.tracking import models
from vegan_scale.tracking.mlflow_run import MlflowRun, NewRun, as_params, check_uri, final_status

log = logging.getLogger(__name__)


def sync(run_dir: RunDir, cfg: Any, uri: str) -> str:
    """Bring a run directory's MLflow run up to date with the directory, creating it when the server never saw it:
    params, metrics, figures, the configuration and the exported model, then the final status from
    exit_status.json. Only what the server lacks is sent: running it twice changes nothing. Returns the run id.
    A server that refuses or does not answer, or a store that does not hold the run, is a TrackingError. It holds
    the run directory's lock, as a training does: a second sync, or one beside the training, would create a second
    MLflow run or log the model twice."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    check_uri(uri)
    try:
        lock, holder = run_dir.take_lock("vegan-scale sync")
    except OSError:  # a directory it cannot write, where sync cannot keep a new run's id either (see _sync)
        lock, holder = None, None
    if holder is not None:
        raise RunDirInUseError(f"{run_dir.path} is in use by {holder}: sync it again once that process has ended")
    try:
        return _sync(run_dir, cfg, uri)
    except OSError as e:  # a file of the run directory (MLflow wraps its own network errors)
        raise DataError(
            f"cannot bring {run_dir.path} up to date in MLflow: {e}; mend or remove that file, then sync again"
        ) from None
    except (MlflowException, SQLAlchemyError) as e:  # a sqlite store's own errors are not all MLflow's
        raise _unsynced(run_dir, uri, e) from None
    finally:
        if lock is not None:
            lock.close()


def _unsynced(run_dir: RunDir, uri: str, e: Exception) -> TrackingError:
    why = str(e).strip().splitlines()[0][:300]
    if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST" and run_dir.read_mlflow_run_id() is not None:
        return TrackingError(
            f"the MLflow run named in {run_dir.mlflow_run_id} is not in the store at {uri} ({why}): sync to the store "
            "that holds it (--uri), or remove that file to make a new run there with all the run directory holds"
        )
    return TrackingError(
        f"cannot bring {run_dir.path} up to date in MLflow at {uri}: {why}; check the URI (--uri, else the run's "
        "tracking.uri) and that its server answers, then sync again: it sends only what the store lacks"
    )


def _sync(run_dir: RunDir, cfg: Any, uri: str) -> str:
    run_dir.own_mlflow_record()
    run_id, params = run_dir.read_mlflow_run_id(), as_params(cfg)
    if run_id is None:
        why = unwritable(run_dir.mlflow_run_id)  # the new run's id could not be kept: every try would make another
        if why is not None:
            raise StorageError(
                f"{run_dir.path} cannot be written ({why}): sync keeps the MLflow "
                f"run it creates in {run_dir.mlflow_run_id.name} there, and would create another at every try. Make "
                "the directory writable (or sync a copy of it), then sync again; no MLflow run was created"
            )
        run = MlflowRun.create(uri, NewRun.of(cfg, run_dir, uri, {"sync": "created by vegan-scale sync"}), run_dir)
    else:
        run = MlflowRun(uri, run_id, new=False)
        run.send_params(params)
    run.send_run_dir(run_dir)
    run.send_artifacts(run_dir.config, None)
    if run_dir.eval_json.is_file():  # `vegan-scale eval` whose logging failed, or a run the server never saw
        try:
            run.send_evaluation(run_dir.eval_json)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning(
                "%s cannot be read (%s): its metrics are not sent; run `vegan-scale eval` again", run_dir.eval_json, e
            )
    status = run_dir.read_exit_status()
    if run_dir.export.is_dir():
        _send_model(run, run_dir, cfg, params, status["step"] if status is not None else 0)
    if status is not None:
        run.finish(final_status(status["code"]))
    return run.run_id


def _send_model(run: MlflowRun, run_dir: RunDir, cfg: Any, params: dict[str, str], last_step: int) -> None:
    """The run's export as its model, at the export's step (``last_step`` for an export written before the step was
    kept in it). An export interrupted between its files, or with weights that cannot be read, is not sent (logging
    it would fail half-way, leaving a model PENDING in the store): a warning says how to write it again, and the
    rest of the run is sent."""
    try:
        export.check_is_export(run_dir.export)
        step = export.step_of(run_dir.export)
    except ConfigError as e:
        log.warning(
            "%s; its model is not sent: write it again with `vegan-scale export %s --out %s`, then sync again",
            e,
            run_dir.path,
            run_dir.export,
        )
        return
    step = last_step if step is None else step
    models.log_model(run.client, run.run_id, run_dir.export, run_dir.config, params, step, cfg.tracking.register_as)


def log_evaluation(run_dir: RunDir, uri: str, report: Path | None = None) -> str:
    """Send what ``vegan-scale eval`` wrote in the run's eval.json (or in ``report``, its --out) to its existing
    MLflow run, finished or not (:meth:`MlflowRun.send_evaluation`); returns the run id. Sent once, without retries:
    the file keeps the values, and ``vegan-scale sync`` sends the run's eval.json later."""
    run = MlflowRun.of_run_dir(uri, run_dir)
    run.send_evaluation(report or run_dir.eval_json)
    return run.run_id
