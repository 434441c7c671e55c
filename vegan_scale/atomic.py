"""Durable, atomic writes: a file (or a directory) is either absent, the previous version, or whole.

Every file vegan_scale publishes in place (checkpoint markers, ``latest``, ``exit_status.json``, exports, shards,
``sizes.json``, ``eval.json``) is written under a temporary name, flushed and fsynced, renamed over the final name,
and then the directory is fsynced, so that the rename itself survives a power loss. Without the fsyncs a journaling
file system may persist the rename before the data, leaving a "complete" file with missing bytes (the failure
torchtitan's and open_clip's checkpointers guard against the same way).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    """Where ``path`` is written before it is published."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (a rename into it, a file created in it)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under ``directory`` (files written by code that does not sync, such as
    DeepSpeed's checkpoint writer), deepest first."""
    for folder, _, files in os.walk(directory, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(Path(folder))


def publish_file(tmp: Path, path: Path) -> Path:
    """Make the fully written file ``tmp`` the file ``path``: sync it, rename it, sync the directory."""
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def writing(path: Path) -> Iterator[Path]:
    """``with writing(path) as tmp:`` write ``tmp`` by any means (``torch.save``, ``save_file``); on leaving the
    block it is published as ``path``. On an exception the temporary file is removed and ``path`` is untouched."""
    tmp = tmp_path(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # one an earlier attempt left: were it a pipe it would hold the writer, a link be written through
    try:
        yield tmp
        publish_file(tmp, path)  # (a directory in its place: the temporary file goes too)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Writes to ``path`` inside: an OSError that does not say which file (a failed ``write`` or ``flush`` on an open
    file: a full disk) is raised again naming it, so that the error a person reads names the file."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def os_error_of(error: Exception, path: Path) -> OSError:
    """A writer's own error for a failed system call (safetensors' "I/O error: No space left on device (os error
    28)") as the OSError it was, naming ``path``: storage errors are then said as such (exit 74), not as a crash."""
    found = re.search(r"os error (\d+)", str(error))
    code = int(found[1]) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def unwritable(path: Path) -> str | None:
    """Why ``path`` could not be published (its directory is created if missing), or None: asked before work whose
    result a failed write would lose, such as an evaluation's minutes."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        return f"{path.parent} is not a directory"
    except OSError as e:
        return f"{e.filename}: {e.strerror}"
    if path.is_dir():
        return "a directory is in its place"
    if not os.access(path.parent, os.W_OK):
        return "a read-only file system, or no permission to write there"
    return None


def write_bytes(path: Path, data: bytes) -> Path:
    """Publish ``data`` as ``path``, atomically and durably."""
    with naming(path), writing(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
    return path


def write_text(path: Path, text: str) -> Path:
    """Publish ``text`` (UTF-8) as ``path``, atomically and durably."""
    return write_bytes(path, text.encode())


def remove(path: Path) -> None:
    """Remove the entry ``path``, whatever it is: a directory with what it holds, or a file or a symbolic link
    itself, never what a link points to (an operator's checkpoint moved to other storage and linked back)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def publish_dir(tmp: Path, final: Path) -> Path:
    """Rename a fully written directory ``tmp`` to ``final`` (replacing an older ``final``), after syncing what is
    inside it, and sync the parent so that the rename lasts."""
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)  # an older copy of the step; a file in its place is someone's (the error names it)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final
