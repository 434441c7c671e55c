"""Small records read back from storage, where a file may be damaged or something else may stand in its place.

:func:`read` takes a regular file only, opened without blocking and read up to a bound: a FIFO in place of a run's
``state.json`` held the reader in ``open()`` for ever (and a stop signal with it, the handler's flag never looked
at), and a link to ``/dev/zero`` read until memory ran out. :func:`loads`: ``json.loads`` already raises ValueError
for text that is not JSON (JSONDecodeError) and for bytes that are not UTF-8 (UnicodeDecodeError), but
RecursionError for nesting deeper than Python follows; the readers of run records, checkpoints and shard indexes
catch one error instead of knowing all three.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

MAX_BYTES = 64 << 20  # above any record (a sizes.json of a million shards is 40 MB)


class NotRegularFile(OSError):
    """A pipe, a device or a directory where a file was expected."""


def open_regular(path: Path) -> int:
    """A descriptor of the regular file at ``path``, opened for reading without blocking: NotRegularFile (an
    OSError) for anything else; the other OSErrors (a missing file, a permission) as ``open`` raises them."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "not a regular file (a pipe, a device or a directory)", str(path))
    return fd


def read(path: Path, max_bytes: int = MAX_BYTES) -> bytes:
    """The bytes of the regular file at ``path`` (:func:`open_regular`), ValueError when it holds more than
    ``max_bytes``."""
    with os.fdopen(open_regular(path), "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path} holds more than {max_bytes >> 20} MiB, far more than any record")
    return data


def load(path: Path) -> Any:
    """The JSON record in the file at ``path`` (:func:`read`, then :func:`loads`)."""
    return loads(read(path))


def loads(data: str | bytes) -> Any:
    """``json.loads(data)``; ValueError for anything that is not JSON, however deeply nested."""
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("nested more deeply than Python can follow") from None
