"""An MLflow run seen from a run directory: created once, added to without repeats (sync.py brings it up to date).

Nothing is logged twice: a run continued from a checkpoint reopens its MLflow run (its id is kept in the run
directory) without re-logging params, first sends whatever of ``metrics.jsonl`` the server lacks (what was queued
when the run was killed), and from then on skips, per metric, the steps the server already has: after an exact
resume they carry the same values. ``vegan-scale sync`` uses the same de-duplication to send what a server that
was away missed. This package is the only one that imports mlflow, and it changes no process-wide setting: the CLI
chooses MLflow's HTTP timeout and retries (its environment variables).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vegan_scale import metrics_log, provenance, stored_json
from vegan_scale.config.fields import in_use
from vegan_scale.config.load import flat_keys
from vegan_scale.errors import ConfigError, ExitCode
from vegan_scale.rundir import RunDir

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
METRICS_PER_REQUEST = 1000  # MLflow's limit for one log_batch
METRIC_NAME = re.compile(r"[\w\-. /]{1,250}")  # the names MLflow takes: letters, digits and _ - . space /
FIGURE_STEP_TAG = "vegan_scale.figures.{key}.last_step"  # what a continued run or sync need not send again
CREATED_BY_TAG = "vegan_scale.created_by"  # the run directory's creation token (RunDir.mlflow_token)
# Which of the MLflow UI's views an experiment belongs in: a trainer's runs belong in the model-training one (a
# reserved experiment tag, which MLflow's UI reads where its view is not chosen UI-wide).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_VIEW = "machine_learning"  # the same choice as a link parameter (MLflow 3.17's UI reads this one)
API_PROBE = "/api/2.0/mlflow/experiments/get?experiment_id=0"  # a read that needs the database


def as_params(cfg: Any) -> dict[str, str]:
    """A configuration as MLflow params, {"section.key": "value"}: only the settings the run uses (the option
    sections of the penalties and networks it does not use are left out)."""
    return {key: str(value)[:MAX_PARAM_LENGTH] for key, value in flat_keys(in_use(cfg)).items()}


def resolve_uri(configured: str | None, root: Path) -> str:
    """The tracking URI: the configured one, else $MLFLOW_TRACKING_URI, else a sqlite file in the runs root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"


def resolve_experiment(configured: str | None, run_experiment: str) -> str:
    """The MLflow experiment: the configured one, else $MLFLOW_EXPERIMENT_NAME, else the run's experiment."""
    return configured or os.environ.get("MLFLOW_EXPERIMENT_NAME") or run_experiment


# What MLflow tracks to: a server, or a database through SQLAlchemy (sqlite:///PATH, postgresql://..., a driver
# after a "+": postgresql+psycopg2://...), or Databricks. MLflow 3 refuses a plain directory (file:).
STORE_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def check_uri(uri: str) -> None:
    """Refuse a tracking URI MLflow cannot track to, at once: a misspelt one would never answer, and a run would
    train for hours with its tracking failing in the background."""
    scheme = re.match(r"([a-z][\w.-]*)(\+[\w.-]+)?:", uri)
    kind = scheme[1] if scheme else None
    if uri != "databricks" and kind not in STORE_SCHEMES:
        problem = "is not a store MLflow tracks to (its scheme in lowercase)"
    elif kind in ("http", "https") and not _host_and_port(uri):
        problem = "is not a server's address (a host, and a port of digits if any)"
    elif kind == "sqlite" and (not uri[7:].strip("/") or ":memory:" in uri or "mode=memory" in uri):
        problem = "is a database in memory, gone when the process ends"
    else:
        return
    raise ConfigError(
        f"tracking URI {uri!r} {problem}: use http(s)://HOST:PORT for a server or sqlite:///PATH/mlflow.db for a "
        "file (MLflow 3 no longer writes plain directories); set it with tracking.uri, --uri or $MLFLOW_TRACKING_URI"
    )


def _host_and_port(uri: str) -> bool:
    """Whether an http(s) URI has a host and, if it gives a port, a valid one (urllib raises on reading it)."""
    try:
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname or ""
        return bool(host) and not any(c.isspace() for c in host) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number or out of range, an unclosed [IPv6 address
        return False


def check_reachable(uri: str, on_unreachable: str) -> bool:
    """A tracking server must answer at start, unless the user chose to train without it; whether it answered.
    A URI of no tracking store is refused either way (:func:`check_uri`)."""
    check_uri(uri)
    if (problem := unanswered(uri)) is None:
        return True
    if on_unreachable == "error":
        raise ConfigError(
            f"{problem}; start it, fix tracking.uri, or set tracking.on_unreachable=continue to train "
            "without it (metrics stay in the run directory; `vegan-scale sync RUN_DIR` sends them later)"
        )
    log.warning("%s; training anyway and retrying in the background", problem)
    return False


def is_server(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (rather than a database MLflow opens itself)."""
    return uri.startswith(("http://", "https://"))


def unanswered(uri: str) -> str | None:
    """Why the tracking server at ``uri`` does not answer, each request given 10 s: its health check, then one read
    of its API (a server whose database is locked passes the first and holds every request that needs the
    database); None when both are answered, or when ``uri`` names no server."""
    if not is_server(uri):
        return None
    base = uri.rstrip("/")
    try:
        _ask(base + "/health")
    except (urllib.error.URLError, OSError) as e:
        return f"the MLflow server at {uri} does not answer ({e})"
    try:
        _ask(base + API_PROBE)
    except urllib.error.HTTPError:
        pass  # an answer: the experiment, or why not (none such, not allowed)
    except (urllib.error.URLError, OSError) as e:
        return (
            f"the MLflow server at {uri} answers its health check but not its API ({e}): the database behind it "
            "may be locked or out of reach"
        )
    return None


def _ask(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as response:
        response.read()


@dataclass(frozen=True)
class NewRun:
    """What a run's MLflow run is created with, the first time."""

    experiment: str
    name: str
    tags: dict[str, str]  # a continued run adds this attempt's tags to the run it reopens
    params: dict[str, str]
    artifact_root: Path | None  # where a new experiment keeps its artifacts (None: the server's default)

    @classmethod
    def of(cls, cfg: Any, run_dir: RunDir, uri: str, tags: dict[str, str]) -> NewRun:
        """A run directory's MLflow run: its experiment, name and params from the configuration, tags saying what
        a person filters runs by (the code, the recipe; how it was launched from ``tags``)."""
        recipe = {"recipe": f"{cfg.penalty.kind}/{cfg.cost.kind}/{cfg.model.network}"}
        # with a local store, keep artifacts beside mlflow.db rather than in ./mlruns of whatever the cwd is
        artifact_root = Path(cfg.run.root).resolve() / "mlartifacts" if uri.startswith("sqlite") else None
        return cls(
            resolve_experiment(cfg.tracking.experiment, cfg.run.experiment),
            run_dir.path.name,
            {**provenance.tags(), **recipe, **tags, **cfg.tracking.tags},
            as_params(cfg),
            artifact_root,
        )


class MlflowRun:
    """One MLflow run, seen from this process: what it already holds, and how to add to it without repeats."""

    def __init__(self, uri: str, run_id: str, new: bool) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(tracking_uri=uri), run_id
        self.experiment_id: str | None = None  # when known without asking the server
        self._last: dict[str, int] = {}  # metric key (or figure key) -> last step the server has
        self._new = new  # a new run holds nothing yet: no need to ask

    @classmethod
    def create(cls, uri: str, new: NewRun, run_dir: RunDir) -> MlflowRun:
        """``run_dir``'s new run with its params, its id kept in the directory as soon as the server has made it, so
        that a retry after a later failure (its params refused, the process killed) adds to it rather than make
        another. A retry (of this process or another: a sync killed, a training resumed) whose request made the run
        but lost the answer finds that run by the directory's creation token (:meth:`RunDir.mlflow_token`)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(new.experiment)
        if found is not None:
            experiment_id = found.experiment_id
            if EXPERIMENT_KIND[0] not in found.tags:  # a person's own choice of view is kept
                client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
        else:
            experiment_id = _created_experiment(client, new)
        token = run_dir.mlflow_token()
        made = client.search_runs([experiment_id], f"tags.`{CREATED_BY_TAG}` = '{token}'", max_results=1)
        if made:
            run_id = made[0].info.run_id
        else:
            tags = {**new.tags, CREATED_BY_TAG: token}
            run_id = client.create_run(experiment_id, run_name=new.name, tags=tags).info.run_id
        run_dir.write_mlflow_run_id(run_id)
        run = cls(uri, run_id, new=not made)
        run.experiment_id = experiment_id
        run.send_params(new.params)
        return run

    @classmethod
    def of_run_dir(cls, uri: str, run_dir: RunDir) -> MlflowRun:
        """The existing MLflow run of a run directory (its id is kept there), for adding to it after training."""
        run_id = run_dir.read_mlflow_run_id()
        if run_id is None:
            raise ConfigError(
                f"{run_dir.path} has no {run_dir.mlflow_run_id.name}: its MLflow run was never created "
                "(tracking.backend=none, or the server never answered while it trained)"
            )
        return cls(uri, run_id, new=False)

    def _last_metric_step(self, key: str) -> int:
        if key not in self._last:
            history = [] if self._new else self.client.get_metric_history(self.run_id, key)
            self._last[key] = max((m.step for m in history), default=-1)
        return self._last[key]

    def _last_figure_step(self, key: str) -> int:
        """The last step whose figure ``key`` the server has: a run tag of ours, set after each image (MLflow's
        names for image files are its own business)."""
        figure_key = f"figure:{key}"
        if figure_key not in self._last:
            tags = {} if self._new else self.client.get_run(self.run_id).data.tags
            self._last[figure_key] = int(tags.get(FIGURE_STEP_TAG.format(key=key), -1))
        return self._last[figure_key]

    def send_metrics(self, rows: Iterable[tuple[int, dict[str, float]]]) -> None:
        """The values of ``rows`` (step, metrics) the server lacks: of each key, those of a step after the last one
        it holds or that came before in ``rows`` (a step repeated by a continued run keeps its first values). They
        go in requests of up to MLflow's limit: a request per step took 20 s for 200 steps held back by an outage."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        last: dict[str, int] = {}  # of each key, the last step sent or held
        new: list[Metric] = []
        for step, values in rows:
            for key, value in values.items():
                if key not in last:
                    last[key] = self._last_metric_step(key)
                if step > last[key]:
                    new.append(Metric(key, value, now, step))
                    last[key] = step
        for i in range(0, len(new), METRICS_PER_REQUEST):
            sent = new[i : i + METRICS_PER_REQUEST]
            self.client.log_batch(self.run_id, metrics=sent)
            self._last.update((m.key, m.step) for m in sent)

    def send_figure(self, step: int, key: str, path: Path) -> None:
        from PIL import Image

        if step <= self._last_figure_step(key):
            return
        try:
            with Image.open(path) as img:
                image = img.copy()
        except OSError as e:  # cut short or damaged on storage: the figures after it still go
            log.warning("%s cannot be read (%s): that figure is not sent", path, e)
            return
        self.client.log_image(self.run_id, image, key=key, step=step)
        self.client.set_tag(self.run_id, FIGURE_STEP_TAG.format(key=key), str(step))
        self._last[f"figure:{key}"] = step

    def send_params(self, params: dict[str, str]) -> None:
        """The params the run lacks (a param, once logged, cannot change)."""
        from mlflow.entities import Param

        held = {} if self._new else self.client.get_run(self.run_id).data.params
        missing = [Param(k, v) for k, v in params.items() if k not in held]
        for i in range(0, len(missing), 100):
            self.client.log_batch(self.run_id, params=missing[i : i + 100])

    def send_artifacts(self, path: Path, artifact_path: str | None) -> None:
        """A file, or a directory's files, among the run's artifacts (under ``artifact_path``), those it lacks."""
        held = {Path(a.path).name for a in self.client.list_artifacts(self.run_id, artifact_path)}
        for file in [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()):
            if file.name not in held:
                self.client.log_artifact(self.run_id, str(file), artifact_path)

    def finish(self, status: str) -> None:
        """End the run with ``status``, unless it already ended so."""
        if self.client.get_run(self.run_id).info.status != status:
            self.client.set_terminated(self.run_id, status=status)

    def send_evaluation(self, path: Path) -> None:
        """An evaluation's eval.json: its metrics (final/…, the floor as final/real/…) at the step of the weights it
        measured, each where the run does not hold that value at that step already (an evaluation logged twice, or
        sent again by sync, adds nothing), and the file among the artifacts."""
        from mlflow.entities import Metric

        report = stored_json.load(path)
        step, now = report.get("step") or 0, int(time.time() * 1000)
        values = {f"final/{k}": float(v) for k, v in report["model"].items()}  # a value that is no number: ValueError
        values |= {f"final/real/{k}": float(v) for k, v in report["real"].items()}
        held = {k: [m.value for m in self.client.get_metric_history(self.run_id, k) if m.step == step] for k in values}
        new = [Metric(k, v, now, step) for k, v in values.items() if not any(_stored(v, h) for h in held[k])]
        if new:
            self.client.log_batch(self.run_id, metrics=new)
        self.client.log_artifact(self.run_id, str(path))

    def send_run_dir(self, run_dir: RunDir) -> None:
        """Send what a run directory holds and the server lacks: the rows of its metrics.jsonl, then its figures."""
        lines = metrics_log.read(run_dir.metrics)
        named = [
            (line["step"], {k: v for k, v in line.items() if k != "step" and METRIC_NAME.fullmatch(k) and _number(v)})
            for line in lines
        ]
        left = sum(len(line) - 1 for line in lines) - sum(len(values) for _, values in named)
        if left:  # a byte damaged inside a name or a value: MLflow would refuse the whole batch, at every retry
            log.warning("%s: %d value(s) that are no number or under names MLflow refuses left out", run_dir.metrics,
                        left)  # fmt: skip
        self.send_metrics(named)
        for key, step, path in run_dir.saved_figures():
            self.send_figure(step, key, path)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _created_experiment(client: Any, new: NewRun) -> str:
    """The id of ``new``'s experiment, created here or, when another process (a job array's task starting at the
    same moment) created it first, that one: the refusal left the run untracked."""
    from mlflow.exceptions import MlflowException

    location = str(new.artifact_root / new.experiment) if new.artifact_root else None
    try:
        return client.create_experiment(new.experiment, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException as e:
        if (
            e.error_code != "RESOURCE_ALREADY_EXISTS"
            or (found := client.get_experiment_by_name(new.experiment)) is None
        ):
            raise
        return found.experiment_id


def _stored(value: float, held: float) -> bool:
    """Whether ``held``, a metric's value read back from the store, is ``value``: NaN is never equal to itself, and
    a sqlite store keeps an infinity as the largest float."""
    if math.isnan(value):
        return math.isnan(held)
    return held == value or (math.isinf(value) and held == math.copysign(sys.float_info.max, value))


def final_status(exit_code: int) -> str:
    """The MLflow status of a run that ended with ``exit_code``."""
    return {ExitCode.OK: "FINISHED", ExitCode.PREEMPTED: "KILLED", ExitCode.INTERRUPTED: "KILLED"}.get(
        exit_code, "FAILED"
    )


def ui_command(uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """What shows a run in the MLflow UI, in the model-training view: MLflow 3's UI picks its view (GenAI or model
    training) from a UI-wide choice that starts at GenAI, or from the link's ``workflowType``."""
    if is_server(uri):
        return f"open {ui_link(uri.rstrip('/'), experiment_id, run_id)}"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    exe = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    link = ui_link("http://127.0.0.1:5000", experiment_id, run_id)
    return f"{exe} ui --backend-store-uri {uri} --port 5000   # then open {link}"


def ui_link(base: str, experiment_id: str | None, run_id: str | None) -> str:
    """The UI page of a run's metric charts (the UI's start page when the run is not known)."""
    view = f"?workflowType={UI_VIEW}"
    if experiment_id is None or run_id is None:
        return f"{base}/{view}"
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics{view}"
