"""Metric tracking: recorded on the device, written to the run directory, then sent to MLflow in the background.

Training never waits for tracking. Per step, :class:`MetricBuffer` adds the loss terms to sums kept on the device
(no sync). Every ``tracking.log_every`` steps the sums are read once (one sync), written as a line of
``metrics.jsonl`` in the run directory, and queued for MLflow. A single background thread owns the MLflow client:
it creates the run, logs the flattened config once, then metrics and images as they come. A slow or absent
tracking server therefore delays only that thread; the run directory always has everything. Only the main process
(global rank 0) creates a :class:`Tracker`. This is the only module that imports mlflow.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
RUN_ID_FILE = "mlflow_run_id"
CLOSE_TIMEOUT_S = 60.0
MAX_PARAM_LENGTH = 6000


class MetricBuffer:
    """Sums of per-step scalars kept on the device; :meth:`flush` returns their means as floats (one sync)."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            v = value.detach().float()
            self.sums[key] = self.sums[key] + v if key in self.sums else v.clone()
        self.count += 1

    def flush(self) -> tuple[dict[str, float], int]:
        """(means since the last flush, number of steps they cover)."""
        count = self.count
        if not self.sums:
            return {}, 0
        keys = list(self.sums)
        means = (torch.stack([self.sums[k] for k in keys]) / count).tolist()
        self.sums, self.count = {}, 0
        return dict(zip(keys, means, strict=True)), count


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict to {"a.b": "value"}, as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:MAX_PARAM_LENGTH]
    return flat


def resolve_uri(configured: str | None, root: Path) -> str:
    """The tracking URI: the configured one, else $MLFLOW_TRACKING_URI, else a sqlite file in the runs root."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root.resolve() / 'mlflow.db'}"


class Tracker:
    """The main process's sink for params, metrics and figures (run directory first, MLflow in the background)."""

    def __init__(
        self,
        run_dir: Path,
        *,
        uri: str | None,
        experiment: str,
        run_name: str,
        params: dict[str, str],
        tags: dict[str, str],
        artifact_root: Path | None,
    ) -> None:
        self.run_dir, self.uri = run_dir, uri
        self.metrics_file = (run_dir / METRICS_FILE).open("a")
        self.run_id: str | None = None
        self._failures = 0
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if uri is not None:
            self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
            self._thread.start()
            self._submit(lambda: self._start_run(experiment, run_name, params, tags, artifact_root))

    def _start_run(
        self, experiment: str, run_name: str, params: dict[str, str], tags: dict[str, str], artifact_root: Path | None
    ) -> None:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = str(artifact_root / experiment) if artifact_root else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        (self.run_dir / RUN_ID_FILE).write_text(self.run_id + "\n")
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        """Record metrics for ``step``: a line in metrics.jsonl now, MLflow later."""
        self.metrics_file.write(json.dumps({"step": step, **values}) + "\n")
        self.metrics_file.flush()
        now = int(time.time() * 1000)

        def send() -> None:
            from mlflow.entities import Metric

            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

        self._submit(send)

    def log_figure(self, step: int, key: str, path: Path) -> None:
        """Send an image already saved in the run directory (shown in MLflow's image view, with its step)."""

        def send() -> None:
            from PIL import Image

            with Image.open(path) as img:
                self.client.log_image(self.run_id, img.copy(), key=key, step=step)

        self._submit(send)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._submit(lambda: self.client.log_artifact(self.run_id, str(path), artifact_path))

    def close(self, status: str) -> None:
        """Finish the MLflow run with ``status`` (FINISHED, FAILED, KILLED) and wait, boundedly, for the queue."""
        self.metrics_file.close()
        if self._thread is None:
            return
        self._submit(lambda: self.client.set_terminated(self.run_id, status=status))
        self._queue.put(None)
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning(
                "MLflow at %s did not take all data within %.0f s; the run directory has everything",
                self.uri,
                CLOSE_TIMEOUT_S,
            )

    def _submit(self, task: Callable[[], None]) -> None:
        if self._thread is not None:
            self._queue.put(task)

    def _work(self) -> None:
        while (task := self._queue.get()) is not None:
            if self.run_id is None and self._failures:
                continue  # the run could not be created; nothing else can be sent
            try:
                task()
            except Exception as e:  # tracking must never end training
                self._failures += 1
                if self._failures == 1:
                    log.warning(
                        "MLflow (%s) failed: %s; training goes on, metrics stay in %s",
                        self.uri,
                        e,
                        self.run_dir / METRICS_FILE,
                    )


def ui_command(uri: str) -> str:
    """The command that shows this store in the MLflow UI."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    exe = str(mlflow_bin) if mlflow_bin.exists() else "mlflow"
    return f"{exe} ui --backend-store-uri {uri} --port 5000   # then open http://127.0.0.1:5000"
