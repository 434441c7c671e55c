"""Exit codes and the exceptions that carry them.

Every way a run can end has its own code, so that a batch script can act on it (requeue, alert, stop). Because
``accelerate launch`` and torchrun turn any non-zero worker code into 1, the trainer also writes the code and its
reason to ``exit_status.json`` in the run directory; see docs/design.md.
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # finished: step budget reached, final checkpoint written
    CRASH = 1  # unexpected exception (traceback printed)
    USAGE = 2  # bad command line or configuration, missing data
    NONFINITE_LOSS = 65  # a loss became NaN/inf (sysexits EX_DATAERR); the last checkpoint is intact
    LOST_RANK = 69  # another process of the job, the data or the tracking store stopped answering (EX_UNAVAILABLE)
    STORAGE = 74  # a file of the run could not be written: full disk, quota, read-only storage (EX_IOERR)
    PREEMPTED = 75  # stopped on request after a checkpoint; requeue to continue (EX_TEMPFAIL)
    INTERRUPTED = 130  # Ctrl-C, after a checkpoint (128 + SIGINT)


class VeganError(Exception):
    """An error meant for a person: the message says what is wrong, where, and what to do."""

    exit_code: ExitCode = ExitCode.CRASH


class ConfigError(VeganError):
    """A configuration or command-line problem; the message names the file or dotted key."""

    exit_code = ExitCode.USAGE


class RunRefusedError(ConfigError):
    """This attempt does not take over the run in its directory (another training holds it, ``train.resume=never``,
    or settings the run cannot change): nothing of the run is touched, its exit_status.json included, so that a
    finished run stays finished for ``sync`` and a sweep."""


class RunDirInUseError(RunRefusedError):
    """Another training process holds the run directory (the same run started twice)."""


class DataError(VeganError):
    """Missing or malformed data; the message names the path and how to get or fix it."""

    exit_code = ExitCode.USAGE


class DataStallError(VeganError):
    """The data stopped coming: no batch within data.stall_timeout_s (a read that never returned: a stuck file
    system, a FIFO), or a loader worker that ended (killed by the out-of-memory killer)."""

    exit_code = ExitCode.LOST_RANK


class TrackingError(VeganError):
    """The tracking store did not answer, or refused what `vegan-scale sync` sent (a run it does not hold): nothing
    of the run directory changed, and the same command sends what is missing once the store is right."""

    exit_code = ExitCode.LOST_RANK


class NonFiniteLossError(VeganError):
    exit_code = ExitCode.NONFINITE_LOSS


class PreemptedError(VeganError):
    """The run stopped on request (flag file, SIGUSR1, SIGTERM) after writing a checkpoint."""

    exit_code = ExitCode.PREEMPTED


class InterruptedRunError(VeganError):
    """The run stopped on Ctrl-C after writing a checkpoint."""

    exit_code = ExitCode.INTERRUPTED


class LostRankError(VeganError):
    """Another process of the job died or stopped answering within the collective timeout."""

    exit_code = ExitCode.LOST_RANK


class StorageError(VeganError):
    """A file of the run could not be written (a full disk or quota, a read-only or failing file system); the
    message names it, what is intact and what to do."""

    exit_code = ExitCode.STORAGE


class CheckpointError(VeganError):
    """A checkpoint that cannot or must not be loaded (incomplete, or holding more than tensors)."""

    exit_code = ExitCode.USAGE


RESUME = "train.resume=auto with the same run.name continues the run"  # what to do once the cause is mended


STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})  # no room, no quota left, read-only


def storage_error(error: BaseException) -> StorageError | None:
    """A write that failed for want of room or of a writable file system, as the StorageError a person can act on;
    None for any other error. (Checkpoints and the export say more: what is intact, how to go on.)"""
    if not isinstance(error, OSError) or error.errno not in STORAGE_ERRNOS:
        return None
    return StorageError(
        f"{error.filename or 'a file of the run'} could not be written: {error.strerror}. Free space there (or raise "
        f"the quota), then {RESUME} from its last complete checkpoint"
    )


def in_the_way(error: BaseException) -> bool:
    """Whether a write failed because something else holds its place (a file where a directory goes, or the
    reverse), which freeing space does not mend."""
    return isinstance(error, OSError) and error.errno in (errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENOTEMPTY)


def exit_status(error: BaseException) -> tuple[int, str]:
    """(exit code, reason) of a run that ended with ``error``, as exit_status.json records it."""
    error = storage_error(error) or error
    if isinstance(error, VeganError):
        return int(error.exit_code), str(error)
    if isinstance(error, KeyboardInterrupt):
        return int(ExitCode.INTERRUPTED), "interrupted at once (second Ctrl-C), without a checkpoint"
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return int(ExitCode.CRASH), f"crashed: {type(error).__name__}: {first}"
