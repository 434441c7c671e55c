"""The main process's tracker: the MLflow run opened before training, then everything sent by one background thread.

Training never waits for tracking: the engine writes each metric flush to ``metrics.jsonl`` in the run directory
first (:mod:`vegan_scale.metrics_log`), then hands it to :class:`Tracker`, whose single background thread owns the
MLflow client and sends in order. Nothing is lost when the server goes away: a send that fails for a transient
reason (connection refused, timeout, HTTP 5xx) is retried with backoff, in order, until it goes through; meanwhile
training goes on and the queue grows. When the run ends with sends still pending, the warning says how to send them
later (``vegan-scale sync RUN_DIR``), since ``metrics.jsonl`` holds everything. Only the main process (global rank
0) tracks.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vegan_scale import retry
from vegan_scale.retry import Backoff
from vegan_scale.rundir import RunDir
from vegan_scale.tracking import models
from vegan_scale.tracking.mlflow_run import (
    MlflowRun,
    NewRun,
    check_reachable,
    check_uri,
    is_server,
    resolve_uri,
    ui_command,
)
from vegan_scale.tracking.system_metrics import SystemMetrics

log = logging.getLogger(__name__)

SEND_BACKOFF = Backoff(attempts=None, backoff_s=1.0, max_wait_s=30.0)  # a send waits for the server for ever
# Errors a retry cannot fix: the request itself is wrong.
PERMANENT_ERRORS = (
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "RESOURCE_ALREADY_EXISTS",
    "INVALID_STATE",
    "RESOURCE_DOES_NOT_EXIST",  # a run the store does not hold (another store than its first): it never will
)
OPEN_WAIT_S = 20.0  # how long the first step waits for a tracking server to open the run


class Tracker:
    """The main process's MLflow run: params, tags, metrics, figures and the model, sent by a background thread."""

    def __init__(
        self,
        run_dir: RunDir,
        *,
        uri: str,
        new: NewRun,
        resume_notes: list[str] | None = None,
        close_timeout_s: float = 60.0,
        system_metrics: bool = False,
        node_id: str | None = None,
        register_as: str | None = None,
        answered: bool = True,
    ) -> None:
        """``resume_notes`` is None for a new run, else the allowed setting changes of a continued one;
        ``system_metrics`` adds MLflow's sampler of this node's CPU, memory, disk, network (and GPU) use, labelled
        ``node_id`` in a run of several nodes; ``register_as`` registers the logged model under that name;
        ``answered``: whether the server answered at start (if not, the run is opened in the background only)."""
        self.run_dir, self.uri, self.close_timeout_s = run_dir, uri, close_timeout_s
        self.register_as, self.params = register_as, new.params
        self.system_metrics, self.node_id = system_metrics, node_id
        self._monitor: SystemMetrics | None = None
        self.mlflow: MlflowRun | None = None
        self.pending = 0
        self.refused = 0  # updates MLflow refused, or dropped because it refused to open the run
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._rows: list[tuple[int, dict[str, float]]] = []  # metrics not yet taken by the sending thread
        self._rows_lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()
        # The run is opened by the sending thread before the first step: a process killed while MLflow migrates a
        # new sqlite store leaves it unusable, so a local store's opening stays out of training. A server is waited
        # for at most OPEN_WAIT_S: one that answers its health check and hangs on the API would otherwise hold the
        # first step for MLflow's own timeouts (120 s a request, 7 retries: a quarter of an hour by default).
        # MLflow logs each failed database call with its traceback before raising it: a store on a full disk would
        # print one at every retry, for the whole run. The tracker reports a failing store once, in one line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        tried = threading.Event()  # the first attempt to open the run ended, opened or not
        self._opening = functools.partial(_first_try, functools.partial(self._open_run, new, resume_notes), tried)
        self._submit(self._opening)
        if not answered:  # already said: the server is not waited for
            return
        if not tried.wait(OPEN_WAIT_S if is_server(uri) else None):
            log.warning(
                "MLflow at %s has not answered the opening of the run in %.0f s; training anyway, the run is opened "
                "in the background",
                uri,
                OPEN_WAIT_S,
            )

    @staticmethod
    def check(cfg: Any) -> None:
        """Refuse, before the run directory is made, a tracking URI MLflow cannot track to
        (:func:`~vegan_scale.tracking.mlflow_run.check_uri`); whether a server answers is seen when the run starts."""
        if cfg.tracking.backend != "none":
            check_uri(resolve_uri(cfg.tracking.uri, Path(cfg.run.root)))

    @classmethod
    def for_run(
        cls,
        cfg: Any,
        run_dir: RunDir,
        launch_tags: dict[str, str],
        resume_notes: list[str] | None,
        node_id: str | None = None,
    ) -> Tracker | None:
        """The tracker an experiment's ``tracking`` section asks for (None for ``backend=none``), after checking
        that a tracking server answers; ``launch_tags`` say how this attempt was launched, ``node_id`` labels this
        node's system metrics in a run of several nodes."""
        t = cfg.tracking
        if t.backend == "none":
            return None
        uri = resolve_uri(t.uri, Path(cfg.run.root))
        answered = check_reachable(uri, t.on_unreachable)
        tracker = cls(
            run_dir,
            uri=uri,
            new=NewRun.of(cfg, run_dir, uri, launch_tags),
            resume_notes=resume_notes,
            close_timeout_s=t.close_timeout_s,
            system_metrics=t.system_metrics,
            node_id=node_id,
            register_as=t.register_as,
            answered=answered,
        )
        tracker.log_artifact(run_dir.config)
        return tracker

    @property
    def run_id(self) -> str | None:
        return self.mlflow.run_id if self.mlflow else None

    def ui(self) -> str:
        """What shows this run in the MLflow UI (the model-training view of its charts)."""
        experiment = self.mlflow.experiment_id if self.mlflow else None
        return ui_command(self.uri, experiment, self.run_id)

    def _open_run(self, new: NewRun, resume_notes: list[str] | None) -> None:
        from mlflow.entities import RunTag

        self.run_dir.own_mlflow_record()
        run_id = self.run_dir.read_mlflow_run_id()
        if resume_notes is not None and run_id is not None:
            run = MlflowRun(self.uri, run_id, new=False)  # kept once opened: a run deleted in the store refuses
            client = run.client
            held = client.get_run(run_id)
            run.experiment_id = held.info.experiment_id
            count = int(held.data.tags.get("resume.count", "0")) + 1
            client.update_run(run_id, status="RUNNING")
            tags = {**new.tags, "resume.count": str(count)}  # this attempt's launch, commit and restart count
            if resume_notes:
                tags[f"resume.{count}.changed"] = "; ".join(resume_notes)[:5000]
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            run.send_run_dir(self.run_dir)  # what an earlier, killed run still had queued
            self.mlflow = run
        else:
            self.mlflow = MlflowRun.create(self.uri, new, self.run_dir)
            if resume_notes is not None:  # a continuation whose earlier attempts never reached the store
                self.mlflow.send_run_dir(self.run_dir)
        if self.system_metrics:
            self._monitor = SystemMetrics(self.mlflow.run_id, self.uri, self.node_id, resume=resume_notes is not None)

    def _stop_system_metrics(self) -> None:
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """Send metrics for ``step`` (already in metrics.jsonl). The sending thread takes every row waiting when it
        gets to one, so that what piled up while the server was slow or away goes in a few requests."""
        with self._rows_lock:
            queued = bool(self._rows)  # rows not taken yet: the send queued with the first of them takes this one
            self._rows.append((step, values))
        if not queued:
            self._submit(functools.partial(self._send_rows, []))

    def _send_rows(self, taken: list[tuple[int, dict[str, float]]]) -> None:
        """Send the rows waiting, taken into ``taken`` at the first try: a retry sends the same ones."""
        if not taken:
            with self._rows_lock:
                taken.extend(self._rows)
                self._rows.clear()
        self.mlflow.send_metrics(taken)

    def log_figure(self, step: int, key: str, path: Path) -> None:
        """Send an image already saved in the run directory (shown in MLflow's image view, with its step)."""
        self._submit(lambda: self.mlflow.send_figure(step, key, path))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._submit(lambda: self.mlflow.client.log_artifact(self.mlflow.run_id, str(path), artifact_path))

    def log_model(self, step: int, directory: Path) -> None:
        """The exported model as the run's MLflow model ``model`` (pyfunc; safetensors weights, no pickle), and a
        registered version when ``register_as`` is set: ``vegan_scale.load("runs:/<run_id>/model")`` reads it."""
        config, params, name = self.run_dir.config, self.params, self.register_as
        self._submit(
            lambda: models.log_model(self.mlflow.client, self.mlflow.run_id, directory, config, params, step, name)
        )

    def close(self, status: str) -> None:
        """Finish the MLflow run with ``status`` (FINISHED, FAILED, KILLED) and wait, boundedly, for the queue."""
        self._submit(self._stop_system_metrics)  # its last samples, while the run still accepts them
        self._submit(lambda: self.mlflow.client.set_terminated(self.mlflow.run_id, status=status))
        self._queue.put(None)
        self._thread.join(self.close_timeout_s)
        if self._thread.is_alive():
            log.warning(
                "MLflow at %s has not taken %d pending update(s) after %.0f s; everything is in %s: send it "
                "with `vegan-scale sync %s` once the server answers",
                self.uri,
                self.pending,
                self.close_timeout_s,
                self.run_dir.metrics,
                self.run_dir.path,
            )

    def _submit(self, task: Callable[[], None]) -> None:
        self.pending += 1
        self._queue.put(task)

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            if self.mlflow is None and task is not self._opening:  # MLflow refused to open the run: nothing to add to
                self.refused += 1
            elif (refusal := _send(task, self.uri)) is not None:
                self.refused += 1
                if self.refused == 1:  # a run deleted in the store refuses every update: said once, counted at close
                    log.warning(
                        "MLflow refused %s (%s); it stays in %s, and later refusals are counted when the run ends",
                        "to open the run" if self.mlflow is None else "an update",
                        _reason(refusal),
                        self.run_dir.path,
                    )
            self.pending -= 1
        if self.refused:
            log.warning(
                "MLflow refused %d update(s) of this run%s; everything is in %s: mend the store (an experiment or run "
                "deleted there: restore it, or name another with tracking.experiment; a run it does not hold, as in "
                "another store than the run's first: remove %s to make a new one) and send it with "
                "`vegan-scale sync %s`",
                self.refused,
                "" if self.mlflow else ", the opening of the run among them",
                self.run_dir.path,
                self.run_dir.mlflow_run_id,
                self.run_dir.path,
            )


def _send(task: Callable[[], None], uri: str) -> Exception | None:
    """Run a task, retrying transient failures with backoff for as long as it takes; the server's refusal, if it
    refuses it (the run directory keeps what it carried)."""
    failing: list[Exception] = []

    def warn_once(error: Exception, wait: float) -> None:
        if not failing:
            log.warning("MLflow at %s fails (%s); training goes on, updates wait and are retried", uri, _reason(error))
        failing.append(error)

    try:
        retry.call(task, SEND_BACKOFF, lambda e: not _refused(e), warn_once)
    except Exception as e:  # refused: tracking must never end training
        return e
    if failing:
        log.warning("MLflow at %s answers again; sending what waited", uri)
    return None


def _first_try(task: Callable[[], None], tried: threading.Event) -> None:
    """``task``, and ``tried`` set once it has run, whatever the outcome (a retry sets it again)."""
    try:
        task()
    finally:
        tried.set()


def _refused(error: BaseException) -> bool:
    """Whether the server refused a request (retrying cannot help), rather than failed to answer it."""
    return getattr(error, "error_code", None) in PERMANENT_ERRORS


def _reason(error: BaseException) -> str:
    """Why a call failed, in one line: the message of its innermost cause. A sqlite store's "database or disk is
    full" reaches the tracker under SQLAlchemy's and MLflow's wrappers, whose first lines say neither."""
    while error.__cause__ is not None:
        error = error.__cause__
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
