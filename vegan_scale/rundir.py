"""The run directory: the one module that names a run's files, and that knows which checkpoint is the newest.

    <run.root>/<run.experiment>/<run.name>/
      config.yaml        the resolved configuration
      train.log          the console log of the main process
      metrics.jsonl      every flushed metric, one JSON object per line (written before MLflow sees it)
      mlflow_run_id      the MLflow run of this directory
      figures/           samples_<step>.png, reconstructions_<step>.png, interpolations_<step>.png
      checkpoints/       step_<step>/ (see vegan_scale.checkpoint for what is inside), latest
      export/            the final model (see vegan_scale.export)
      eval.json          what `vegan-scale eval` measured
      PREEMPT            a stop request (created by a batch script's trap)
      ranks/             rank<R>.json: each process's last step and phase (a heartbeat at every agreement
                         check; after a collective's timeout, its report with rank<R>.stack.txt); shared: a
                         token the main process writes at start, which every process must read back; lock:
                         locked by the main process of the training that writes the directory, which it names;
                         mlflow_create_token, mlflow_home: the token that tags its MLflow run, and where the
                         directory lay when it last tracked (a copy is told by them)
      exit_status.json   {"code", "reason", "step"}: written last, read by batch scripts (launchers turn worker
                         exit codes into 1)

A checkpoint counts only when complete: ``checkpoints/step_<step>/`` holding the ``COMPLETE`` marker (written
last, after everything inside was synced) and not ending in ``.tmp``. Everyone asks this module for the newest.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from vegan_scale import atomic, stored_json
from vegan_scale.errors import ConfigError

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"
READ_ATTEMPTS = 20  # newest checkpoints given up because training pruned them while they were read
T = TypeVar("T")


def checkpoint_name(step: int) -> str:
    """``step_00001000``: zero-padded, so that names list by step."""
    return f"step_{step:08d}"


def named_step(checkpoint: Path) -> int | None:
    """The step in a checkpoint's name (``step_00001000``: 1000), None for any other name: an operator's copy
    (``step_backup``), a partial one (``step_00001000.tmp``)."""
    found = re.fullmatch(r"step_(\d{8,})", checkpoint.name)
    return int(found[1]) if found else None


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is a checkpoint directory that was completely written."""
    return not checkpoint.name.endswith(atomic.TMP_SUFFIX) and (checkpoint / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """The complete checkpoint directories under a ``checkpoints/`` folder, by step, oldest first. Only names
    :func:`checkpoint_name` writes count: a copy under another name would be taken for the newest, continued from
    again and again, while pruning removed the real newest ones."""
    if not root.is_dir():
        return []
    found = [(named_step(p), p) for p in root.glob("step_*")]
    return [p for step, p in sorted((s, p) for s, p in found if s is not None) if p.is_dir() and is_complete(p)]


def default_run_name(parent: Path, penalty: str, network: str, latent_dim: int, global_batch: int, lr: float) -> str:
    """A name that says what ran and when, e.g. mmd-conv-z8-gb100-lr0.001-20250101-120000, that no directory in
    ``parent`` has: a script's second run within the same second (-2, -3, ...) is a new run, not a continuation of
    the first."""
    first = f"{penalty}-{network}-z{latent_dim}-gb{global_batch}-lr{lr:g}-{time.strftime('%Y%m%d-%H%M%S')}"
    name, taken = first, 1
    while (parent / name).exists():
        taken += 1
        name = f"{first}-{taken}"
    return name


_ENTRIES: set[str] = set()  # the names a run writes at the top of its directory


def _entry(name: str) -> property:
    """A path inside the run directory, as a read-only attribute of :class:`RunDir`."""
    _ENTRIES.add(name.split("/")[0])
    return property(lambda self: self.path / name, doc=f"<run_dir>/{name}")


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is created by naming them)."""

    path: Path

    config = _entry("config.yaml")
    train_log = _entry("train.log")
    metrics = _entry("metrics.jsonl")
    mlflow_run_id = _entry("mlflow_run_id")
    figures = _entry("figures")
    checkpoints = _entry("checkpoints")
    export = _entry("export")
    eval_json = _entry("eval.json")
    stop_request = _entry("PREEMPT")
    ranks = _entry("ranks")
    shared = _entry("ranks/shared")
    lock = _entry("ranks/lock")
    mlflow_create_token = _entry("ranks/mlflow_create_token")
    mlflow_home = _entry("ranks/mlflow_home")
    exit_status = _entry("exit_status.json")

    @classmethod
    def containing(cls, checkpoint: Path) -> RunDir | None:
        """The run directory a checkpoint directory (``<run_dir>/checkpoints/step_N``) belongs to, if it is one."""
        candidate = cls(Path(checkpoint).parent.parent)
        return candidate if candidate.is_run() else None

    def is_run(self) -> bool:
        """Whether this is a run directory (it holds the run's configuration)."""
        return self.config.is_file()

    def holds_run(self) -> bool:
        """Whether a run has started here (it may have saved no checkpoint yet)."""
        return self.exit_status.exists() or self.metrics.exists()

    def strangers(self) -> list[str]:
        """What a directory that holds no run holds besides a run's own entries (and their temporary names): a
        training must not write its config.yaml and train.log among someone else's files (run.root or run.name
        naming the wrong directory). Once a run has started here, what its users keep beside it is theirs."""
        if not self.path.is_dir() or self.holds_run() or self.ranks.exists() or self.checkpoints.exists():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.name.removesuffix(atomic.TMP_SUFFIX) not in _ENTRIES)

    def figure(self, key: str, step: int) -> Path:
        return self.figures / f"{key}_{step:08d}.png"

    def saved_figures(self) -> list[tuple[str, int, Path]]:
        """(key, step, path) of every figure saved, by step."""
        found = [(p.stem.rpartition("_"), p) for p in self.figures.glob("*_*.png")]
        figures = [(key, int(step), p) for (key, _, step), p in found if step.isdigit()]
        return sorted(figures, key=lambda f: (f[1], f[0]))

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / checkpoint_name(step)

    def newest_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, if there is one."""
        complete = complete_checkpoints(self.checkpoints)
        return complete[-1] if complete else None

    def read_newest(self, read: Callable[[Path], T]) -> T:
        """``read`` of the newest complete checkpoint, for readers beside a run that may still train: it prunes
        its oldest checkpoints as it writes new ones (checkpoint.keep_last_k), so the newest of a moment ago can
        vanish while it is read. A failure with the checkpoint gone from its name is that (a damaged checkpoint
        stays, and its error stands): the newest is read again."""
        for _ in range(READ_ATTEMPTS):
            newest = self.newest_checkpoint()
            if newest is None:
                raise ConfigError(f"run directory {self.path} holds no complete checkpoint yet")
            try:
                return read(newest)
            except Exception:  # whatever the reader made of files vanishing under it
                if newest.exists():
                    raise
            log.info("%s was pruned by its run while being read; reading the newest again", newest)
        raise ConfigError(
            f"the run in {self.path} replaced its newest checkpoint {READ_ATTEMPTS} times while it was read "
            "(checkpoint.keep_last_k=1 with frequent checkpoints): read its export/ once it has ended, or a copy "
            "of a checkpoint"
        )

    def take_lock(self, role: str = "a training") -> tuple[IO[str] | None, str | None]:
        """Lock the run directory for this process until it closes the file returned (or ends, however it ends):
        (the file, None); or (None, who holds it, said with its ``role``) when another process does. A file system
        without locks (some FUSE mounts, Lustre without its flock option) gives (None, None), with a warning."""
        self.ranks.mkdir(parents=True, exist_ok=True)
        file = self.lock.open("a+")
        try:
            fcntl.lockf(file, fcntl.LOCK_EX | fcntl.LOCK_NB)  # POSIX locks: NFS's lock manager serves them
        except (BlockingIOError, PermissionError):  # held
            file.seek(0)
            holder = file.read().strip() or "a process that has not named itself yet"
            file.close()
            return None, holder
        except OSError as e:
            log.warning("cannot lock %s (%s): a second training of this run would not be noticed", self.lock, e)
            file.close()
            return None, None
        file.truncate(0)
        file.write(
            f"{role}, process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
        )
        file.flush()
        return file, None

    def prepare(self, config_yaml: str, started_at: float) -> None:
        """Create the directory and save the resolved configuration. A stop request older than this process was
        for the attempt it stopped, not for this one; a newer one (sent while this process was starting) stands.
        Partial checkpoints (``step_N.tmp``, left by an attempt that ended while it wrote or pruned one) are removed:
        a checkpoint of the same step would be written into one and publish its stale files (another world size's
        rank files, a ZeRO partition). So is the previous attempt's exit status: while this one trains, a reader
        (`sync`, a sweep, a batch script) would take the run for finished. Only the training that holds the lock
        (:meth:`take_lock`) calls this."""
        self.figures.mkdir(parents=True, exist_ok=True)
        atomic.remove(self.exit_status)
        for partial in self.checkpoints.glob(f"step_*{atomic.TMP_SUFFIX}"):
            log.info("removing %s, a checkpoint an earlier attempt did not finish writing or removing", partial)
            atomic.remove(partial)
        atomic.write_text(self.config, config_yaml)
        if self.stop_request.exists() and self.stop_request.stat().st_mtime < started_at:
            self.stop_request.unlink(missing_ok=True)

    def write_exit_status(self, code: int, reason: str, step: int) -> None:
        atomic.write_text(self.exit_status, json.dumps({"code": code, "reason": reason, "step": step}) + "\n")

    def read_exit_status(self) -> dict[str, Any] | None:
        """The exit status last written, or None when there is none, or none readable: a file damaged on storage
        is named in a warning and read as absent (the run's outcome unknown), rather than stop `sync` or a sweep."""
        try:
            status = stored_json.load(self.exit_status)
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:  # damaged, or a directory in its place
            status = e
        if isinstance(status, dict) and all(isinstance(status.get(k), int) for k in ("code", "step")):
            return status
        log.warning("%s is damaged (%.100s); the run's outcome is taken as unknown", self.exit_status, status)
        return None

    def read_mlflow_run_id(self) -> str | None:
        """The MLflow run of this directory, or None when there is none, or none readable: a damaged file is named
        in a warning and read as absent, so that a new MLflow run is made and sent everything again from
        metrics.jsonl (the old one cannot be found without its id)."""
        try:
            text: Any = stored_json.read(self.mlflow_run_id).decode("ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:  # damaged: not ASCII, too large, no regular file
            text = e
        if isinstance(text, str) and re.fullmatch(r"[0-9a-f]{32}", text):  # MLflow's ids: a UUID's hex digits
            return text
        log.warning(
            "%s is damaged (%.100r); a new MLflow run will be made for this directory", self.mlflow_run_id, text
        )
        return None

    def mlflow_token(self) -> str:
        """The token that tags the MLflow run this directory's first training or sync creates, kept here before
        the run is created: an attempt that never learnt the run's id (the answer lost, the process killed) finds
        the run by it rather than create a second."""
        try:
            token = stored_json.read(self.mlflow_create_token).decode().strip()
        except (OSError, ValueError):  # none yet (or unreadable: a new one serves as well)
            token = ""
        if not re.fullmatch(r"[0-9a-f]{32}", token):
            token = uuid.uuid4().hex
            self.ranks.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.mlflow_create_token, token + "\n")
        return token

    def own_mlflow_record(self) -> None:
        """Make the MLflow run this directory names its own. A copy (``cp -r``, rsync to another cluster) holds its
        original's run id and creation token, so that its training or sync would write into the original's MLflow
        run, two directories' metrics interleaved in one. The directory records where it lies; one that finds its
        record naming another directory that still exists and holds the same token is a copy, and forgets the id
        and the token (its next MLflow run is new and is sent everything from metrics.jsonl). A moved directory
        (the recorded one gone, or the same directory under another mount) keeps its run. Called by the one process
        that tracks the directory."""
        here, copied_from = self.path.resolve(), None
        try:
            recorded = Path(stored_json.read(self.mlflow_home).decode().strip())
            token = stored_json.read(self.mlflow_create_token)
            elsewhere = recorded.is_absolute() and not recorded.samefile(here)
            if elsewhere and stored_json.read(RunDir(recorded).mlflow_create_token) == token:
                copied_from = recorded
        except (OSError, ValueError):  # no record yet, the original gone or unreadable: not a copy
            pass
        try:
            if copied_from is not None:
                self.mlflow_run_id.unlink(missing_ok=True)
                self.mlflow_create_token.unlink(missing_ok=True)
            self.ranks.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.mlflow_home, f"{here}\n")
        except OSError as e:  # a directory that cannot be written keeps what it names (sync refuses to create there)
            log.debug("cannot record where %s lies (%s)", self.path, e)
            return
        if copied_from is not None:
            log.warning("%s is a copy of %s: it gets an MLflow run of its own", self.path, copied_from)

    def write_mlflow_run_id(self, run_id: str) -> None:
        atomic.write_text(self.mlflow_run_id, run_id + "\n")
