"""A node's system metrics (CPU, memory, disk, network; GPU with pynvml) sampled into an MLflow run.

MLflow's public route to them is the fluent API (``mlflow.start_run(run_id, log_system_metrics=True)`` with
``mlflow.set_system_metrics_node_id``), which changes process-wide state: the active run, the tracking URI and the
node id of every later run in the process. vegan_scale opens its runs through a client and changes no process-wide
setting, so it uses the sampler behind that route, ``SystemMetricsMonitor``, which is not public API. This module is
the only place that touches it; the tests run it against the installed MLflow (tests/test_mlflow.py: one node,
``system/...``; tests/test_launch.py, two nodes: ``system/node0/...`` and ``system/node1/...``), so an MLflow
release that changes it fails there, not in a run.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class SystemMetrics:
    """One node's sampler, logging to ``run_id`` at ``uri`` every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds
    (10 by default) under ``system/`` or, with ``node_id``, ``system/<node_id>/``. Never fails a run: a sampler
    that cannot start is a warning."""

    def __init__(self, run_id: str, uri: str, node_id: str | None, resume: bool) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = None
        try:
            self._monitor = SystemMetricsMonitor(run_id, resume_logging=resume, node_id=node_id, tracking_uri=uri)
            self._first_step = self._monitor._logging_step
            self._monitor.start()
        except Exception as e:  # optional: never worth failing the run for
            log.warning("MLflow system metrics%s are off: %s", f" of {node_id}" if node_id else "", e)
            self._monitor = None

    def stop(self) -> None:
        """Log the last samples and stop (before the run ends, while it still accepts them). A sampler stopped
        within its first interval has published nothing (MLflow's loop drops the samples it holds when told to
        stop): it logs one sample then, so that every node of a short run is in it."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        monitor.finish()
        if monitor._logging_step == self._first_step:
            try:
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()
            except Exception as e:  # as at the start: never worth failing the run for
                log.warning("MLflow system metrics were not logged: %s", e)
