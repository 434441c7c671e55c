"""Where a run's metrics and figures go: ``metrics.jsonl`` in the run directory first, then the tracker (MLflow)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vegan_scale.metrics_log import MetricsLog
from vegan_scale.tracking.system_metrics import SystemMetrics
from vegan_scale.tracking.tracker import Tracker


@dataclass
class Records:
    """Where a run's metrics and figures go: metrics.jsonl first, then the tracker (MLflow) when there is one. Only
    the main process records; elsewhere both are None and recording does nothing. ``node`` is the system-metrics
    sampler the first process of every other node runs in a multi-node run."""

    log: MetricsLog | None = None
    tracker: Tracker | None = None
    node: SystemMetrics | None = None

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if self.log is not None:
            self.log.append(step, values)
        if self.tracker is not None:
            self.tracker.log_metrics(step, values)

    def figure(self, step: int, key: str, path: Path) -> None:
        if self.tracker is not None:
            self.tracker.log_figure(step, key, path)

    def export(self, step: int, directory: Path) -> None:
        if self.tracker is not None:
            self.tracker.log_model(step, directory)

    def close(self, status: str) -> None:
        if self.node is not None:
            self.node.stop()
        if self.log is not None:
            self.log.close()
        if self.tracker is not None:
            self.tracker.close(status)
