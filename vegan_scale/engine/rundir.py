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
TRAIN_LOG = "train.log"
LOG_FORMAT = "%(asctime)s | %(levelname)s | rank %(rank)s | %(message)s"
_quiet_console = False  # set by `vegan-scale train --quiet` before training; logging is process-wide anyway


def default_run_name(penalty: str, network: str, latent_dim: int, global_batch: int, lr: float) -> str:
    """A name that says what ran and when, e.g. mmd-conv-z8-gb100-lr0.001-20250101-120000."""
    return f"{penalty}-{network}-z{latent_dim}-gb{global_batch}-lr{lr:g}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    logger = logging.getLogger("vegan_scale")
    for old in [h for h in logger.handlers if h.get_name() == TRAIN_LOG]:  # an earlier run of this process
        logger.removeHandler(old)
        old.close()
    handler = logging.FileHandler(run_dir / TRAIN_LOG)
    handler.set_name(TRAIN_LOG)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_RankStamp(0))  # only the main process writes it
    logger.addHandler(handler)


def set_quiet_console(quiet: bool) -> None:
    """``--quiet``: the console shows warnings and errors only; train.log in the run directory still gets all."""
    global _quiet_console
    _quiet_console = quiet


def setup_console_logging(rank: int) -> None:
    """Console output from the main process only (other ranks log warnings and errors), each line stamped with
    time, level and the global rank, so that interleaved output of several processes can be told apart."""
    level = logging.WARNING if rank != 0 or _quiet_console else logging.INFO
    logging.basicConfig(format=LOG_FORMAT, datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    console = logging.getLogger().handlers[0]
    console.setLevel(level)
    console.addFilter(_RankStamp(rank))
    # the loggers' own level decides what reaches train.log; the console handler filters for the person
    logging.getLogger().setLevel(logging.INFO if rank == 0 else logging.WARNING)


class _RankStamp(logging.Filter):
    """Adds the process's global rank to every record a handler formats (library records included)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def write_exit_status(run_dir: Path, code: int, reason: str, step: int) -> None:
    tmp = run_dir / (EXIT_STATUS + ".tmp")
    tmp.write_text(json.dumps({"code": code, "reason": reason, "step": step}) + "\n")
    os.replace(tmp, run_dir / EXIT_STATUS)
