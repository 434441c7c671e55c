"""The run directory: where a run's config, logs, metrics, figures, checkpoints and exit status live.

<run.root>/<run.experiment>/<run.name>/
  config.yaml        the resolved configuration
  train.log          the console log of the main process
  metrics.jsonl      every flushed metric, one JSON object per line (written before MLflow sees it)
  mlflow_run_id      the MLflow run of this directory
  figures/           samples_<step>.png, reconstructions_<step>.png
  checkpoints/       see vegan_scale.checkpoint
  exit_status.json   {"code", "reason", "step"}: written last, read by batch scripts (launchers turn worker
                     exit codes into 1)
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from vegan_scale.tracking import truncate_metrics

log = logging.getLogger("vegan_scale")

EXIT_STATUS = "exit_status.json"


def default_run_name(penalty: str, network: str, latent_dim: int) -> str:
    return f"{penalty}-{network}-z{latent_dim}-{time.strftime('%Y%m%d-%H%M%S')}"


def prepare(run_dir: Path, config_yaml: str, continue_after: int | None, started_at: float) -> None:
    """Main process: create the directory, save the resolved config, and tee the log into train.log.

    A continued run (``continue_after`` its start step) keeps the metrics of the steps up to where it starts;
    those after it come again, identically, from the continuation.
    """
    (run_dir / "figures").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml)
    if continue_after is not None:
        truncate_metrics(run_dir, continue_after)
    # A stop request older than this process was for the attempt it stopped, not for this one; a newer one (sent
    # while this process was starting) stands.
    flag = run_dir / "PREEMPT"
    if flag.exists() and flag.stat().st_mtime < started_at:
        flag.unlink(missing_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s"))
    logging.getLogger("vegan_scale").addHandler(handler)


def setup_console_logging(is_main: bool) -> None:
    """Console output from the main process only (others log warnings and errors)."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s | %(levelname)s | %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )


def write_exit_status(run_dir: Path, code: int, reason: str, step: int) -> None:
    tmp = run_dir / (EXIT_STATUS + ".tmp")
    tmp.write_text(json.dumps({"code": code, "reason": reason, "step": step}) + "\n")
    os.replace(tmp, run_dir / EXIT_STATUS)
