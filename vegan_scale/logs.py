"""Log lines that say when, how bad and which process: the format, the console handler and the run's log file.

Handlers go on the package's logger (``vegan_scale``) only, never on the root logger: a program that calls
``vegan_scale.train`` keeps its own logging set-up. The CLI installs the console handler (:func:`to_console`); a
run tees its main process's records into ``train.log`` for its duration (:func:`to_file`), starting with those it
logged while it was built (:func:`held`).
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "vegan_scale"
FORMAT = "%(asctime)s | %(levelname)s | rank %(rank)s | %(message)s"
CONSOLE_DATE_FORMAT = "%H:%M:%S"


def current_rank() -> int:
    """This process's global rank: the process group's once it exists, else the launcher's RANK variable. Safe
    while torch is still being imported (a signal handler may log then)."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    except AttributeError:  # torch.distributed half imported
        pass
    return int(os.environ.get("RANK", "0"))


class RankStamp(logging.Filter):
    """Adds the global rank to every record a handler formats; with ``main_only_below``, records under that level
    from ranks other than 0 are dropped (every rank logs, the main process speaks for them)."""

    def __init__(self, main_only_below: int = logging.NOTSET) -> None:
        super().__init__()
        self.main_only_below = main_only_below

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        return record.levelno >= self.main_only_below or record.rank == 0


def say(line: str) -> None:
    """One line on stderr in one write. The processes of a job share the stream, and ``print`` writes the text and
    its newline apart: another process's line then lands between them, and two errors read as one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def to_console(quiet: bool = False) -> logging.Handler:
    """The CLI's console: INFO and up from the main process (WARNING and up with ``quiet``), warnings and errors
    from every process, each line stamped with time, level and rank so that interleaved processes can be told
    apart. Returns the handler (installed on the package's logger)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt=CONSOLE_DATE_FORMAT))
    handler.setLevel(logging.WARNING if quiet else logging.INFO)
    handler.addFilter(RankStamp(main_only_below=logging.WARNING))
    logger = logging.getLogger(PACKAGE)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


@contextlib.contextmanager
def held() -> Iterator[list[logging.LogRecord]]:
    """Inside the block, every record of the package (INFO and up) is also kept in the list it yields, for a log
    file that does not exist yet: what a run says while it is being built (the checkpoint it continues, one it
    passed over) belongs in its train.log, which :func:`to_file` starts with them."""
    handler = logging.handlers.BufferingHandler(capacity=10_000)  # a run's start says a few lines
    handler.setLevel(logging.INFO)
    with _handling(handler):
        yield handler.buffer


class _LogFile(logging.FileHandler):
    """train.log: a record it cannot write (a full disk) is said once on the console, not with a traceback per
    record; the console keeps every record, and the error that stops the run names the file it could not write."""

    failed = False

    def handleError(self, record: logging.LogRecord | None) -> None:
        if not self.failed:
            self.failed = True
            say(f"warning: {self.baseFilename} cannot be written ({sys.exc_info()[1]})")


@contextlib.contextmanager
def to_file(path: Path, earlier: list[logging.LogRecord] | None = None) -> Iterator[None]:
    """Inside the block, every record of the package (INFO and up) is also appended to ``path``, after the
    ``earlier`` ones (from :func:`held`)."""
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RankStamp())
    for record in earlier or []:
        handler.handle(record)
    try:
        with _handling(handler):
            yield
    finally:
        try:
            handler.close()
        except OSError:  # its last records could not be flushed (a full disk): said once, as for any record
            handler.handleError(None)


@contextlib.contextmanager
def _handling(handler: logging.Handler) -> Iterator[None]:
    """``handler`` on the package's logger for the block, which then logs INFO even where the console shows less."""
    logger = logging.getLogger(PACKAGE)
    previous = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
