"""Reading tar shards: opening local files and URLs, retrying transient failures, and iterating samples fast.

A sample is the run of consecutive tar members that share a key (``dir/000123.png`` and ``dir/000123.cls`` form
the sample ``dir/000123`` with fields ``png`` and ``cls``), as in webdataset. The tar headers are parsed here
(USTAR, with GNU long names and PAX paths) rather than through :mod:`tarfile`, which builds an object per member:
``bench/loader.py`` times both grouping one MNIST shard's members into samples (bytes read, nothing decoded), and
this parser reads about 3 times as many samples per second (docs/performance.md); members to skip are passed over
without being read into objects.

Failures are told apart:

* a shard that does not exist (missing file, HTTP 400/404/410) is :class:`ShardMissing`, never retried, and one the
  server refuses (HTTP 401/403) its subclass :class:`AccessDenied`;
* a transient failure (dropped connection, timeout, HTTP 5xx or 429, a failing ``pipe:`` command) is retried
  with exponential backoff, resuming after the samples already delivered, and logged;
* a shard whose bytes end inside a member or carry a bad header is :class:`ShardCorrupt`.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import logging
import re
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, BinaryIO

from vegan_scale import retry
from vegan_scale.data import s3, web
from vegan_scale.data.faults import (
    ShardCorrupt,
    ShardError,
    ShardMissing,
    TransientReadError,
)
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

log = logging.getLogger("vegan_scale.data")

BLOCK = 512
CHUNK = 1 << 20  # the largest single read
MAX_MEMBER_BYTES = 1 << 30  # a tar member larger than this is damage, not an image
OCTAL = re.compile(rb"[0-7]*")
NOT_CONTENT = {  # tar member types that hold no file content of their own
    b"1": "a hard link",
    b"2": "a symbolic link",
    b"3": "a device",
    b"4": "a device",
    b"6": "a FIFO",
    b"S": "a sparse file",
}

Sample = dict[str, object]  # {"__key__": str, "__url__": str, "<ext>": bytes, ...}


class _Window(io.RawIOBase):
    """The bytes [start, end) of a seekable file, under a read buffer: nothing past ``end`` is asked of the file
    system."""

    def __init__(self, raw: BinaryIO, length: int) -> None:
        super().__init__()
        self.raw, self.left = raw, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: self.left]
        n = self.raw.readinto(view)
        self.left -= n
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def open_url(url: str, start: int = 0, end: int | None = None) -> tuple[BinaryIO, bool]:
    """(a binary stream of ``url``, whether it starts at byte ``start``): http(s):// (a Range request), s3:// (the
    same, through boto3), a ``pipe:`` command (webdataset's, from the beginning), else a local path or file://
    (seeked). With ``end``, a local file or URL is read no further than that byte (object stores bill what they
    send)."""
    if s3.is_s3(url):
        return s3.open_object(url, start, end)
    if url.startswith(("http://", "https://")):
        return web.open_http(url, start, end)
    if not url.startswith("pipe:"):
        path = url.removeprefix("file://")
        try:
            raw = open(path, "rb", buffering=0)  # noqa: SIM115 (the caller closes it)
            raw.seek(start)
            window = raw if end is None else _Window(raw, end - start)
            return io.BufferedReader(window, CHUNK), True
        except FileNotFoundError:
            raise ShardMissing(f"shard {url} does not exist") from None
        except (PermissionError, IsADirectoryError) as e:
            raise ShardError(f"shard {url} cannot be read: {e}") from None
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb"), start == 0
    except Exception as e:
        raise TransientReadError(f"cannot open {url}: {e}") from e


class _Tar:
    """A tar stream read block by block, knowing its byte offset, so that damage is reported where it is."""

    def __init__(self, stream: BinaryIO, url: str, offset: int = 0) -> None:
        self.stream, self.url, self.offset = stream, url, offset

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only where the stream ends; read in bounded chunks, so that a size field that lies
        costs no more memory than the bytes that are really there."""
        chunks, left = [], n
        while left > 0:
            chunk = self.stream.read(min(left, CHUNK))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        self.offset += n - left
        return b"".join(chunks)

    def skip(self, n: int) -> int:
        """Pass over ``n`` bytes without keeping them; returns how many there were."""
        done = 0
        while done < n:
            chunk = self.stream.read(min(n - done, CHUNK))
            if not chunk:
                break
            done += len(chunk)
        self.offset += done
        return done

    def damaged(self, at: int, what: str) -> ShardCorrupt:
        return ShardCorrupt(
            f"shard {self.url} {what} at byte {at}; rewrite the shard, or set data.on_error=skip to skip the rest of it"
        )


def _number(field: bytes) -> int:
    """A numeric header field: octal digits ended by NUL or space, or GNU base-256 (first byte 0x80, or 0xff for a
    negative number) for values too large for octal. ValueError for anything else."""
    if field[0] & 0x80:
        if field[0] not in (0x80, 0xFF):
            raise ValueError(f"base-256 field with lead byte {field[0]:#x}")
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if not OCTAL.fullmatch(digits):
        raise ValueError(f"{digits[:12]!r} is not octal")
    return int(digits or b"0", 8)


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum field against the sum of its bytes (unsigned, or signed as some old tars wrote it),
    the checksum field itself counted as spaces."""
    stored = _number(header[148:156])
    rest = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(rest)
    return stored == unsigned or stored == unsigned - 256 * sum(b >= 128 for b in rest)  # the second rarely needed


def _header(tar: _Tar, header: bytes) -> tuple[bytes, int, str]:
    """(type flag, member size, name) of a header block, every field checked before it is used."""
    at = tar.offset - BLOCK
    try:
        if not _checksum_ok(header):
            raise ValueError("its checksum does not match")
        size = _number(header[124:136])
    except ValueError as e:
        raise tar.damaged(at, f"has a malformed tar header ({e}): it is not a tar file or is damaged") from None
    if not 0 <= size <= MAX_MEMBER_BYTES:
        raise tar.damaged(at, f"has a tar header giving a member {size} bytes long (0 to {MAX_MEMBER_BYTES} allowed)")
    name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
    prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace")
    if prefix and header[257:262] == b"ustar":
        name = f"{prefix}/{name}"
    return header[156:157], size, name


def _pax_path(data: bytes) -> str | None:
    for record in data.split(b"\n"):
        _, _, keyvalue = record.partition(b" ")
        key, _, value = keyvalue.partition(b"=")
        if key == b"path":
            return value.decode(errors="replace")
    return None


def iter_members(
    stream: BinaryIO, url: str, wanted: Callable[[str], bool], at: int = 0
) -> Generator[tuple[str, bytes | None, int], None, int]:
    """(name, content, offset of its first header) of every regular file of a tar stream (which starts at byte
    ``at`` of the shard), content None where ``wanted(name)`` is false (the bytes are passed over); returns the
    offset where the members end. Raises ShardCorrupt, naming the shard and the byte offset, on truncation or a
    damaged header, and DataError for a sample's member that is a link, device or sparse file (webdataset passes
    over those, and their samples lose a field or vanish)."""
    tar = _Tar(stream, url, at)
    long_name: str | None = None
    first: int | None = None  # the first header of the entry (a long name's header comes before the member's)
    while True:
        header = tar.read(BLOCK)
        if not header or header == bytes(BLOCK):
            return tar.offset - len(header)
        if len(header) < BLOCK:
            raise tar.damaged(tar.offset - len(header), "is truncated (a partial tar header at its end)")
        kind, size, name = _header(tar, header)
        regular = kind in (b"0", b"\0", b"7")
        if long_name and kind not in (b"L", b"K", b"x"):  # it names the next entry, a directory or link too
            name, long_name = long_name, None
        padded, start = size + (-size % BLOCK), tar.offset - BLOCK  # the member's header
        if kind in NOT_CONTENT and _is_field(*split_name(name)):  # its sample would be read without it
            raise DataError(
                f"shard {url}: member {name!r} (byte {start}) is {NOT_CONTENT[kind]}, which is not read: write the "
                "tar with the files' contents (GNU tar --dereference --hard-dereference, without --sparse), or with "
                "`vegan-scale shards`"
            )
        first = start if first is None else first
        if regular and not wanted(name):
            if tar.skip(padded) < padded:
                raise tar.damaged(start, f"is truncated inside member {name!r}")
            yield name, None, first
            first = None
            continue
        data = tar.read(padded)
        if len(data) < padded:
            raise tar.damaged(start, f"is truncated inside member {name!r} ({len(data)} of {padded} bytes)")
        data = data[:size]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.split(b"\0", 1)[0].decode(errors="replace")
        elif kind == b"x":  # PAX extended header of the next member
            long_name = _pax_path(data) or long_name
        else:
            if regular:
                yield name, data, first
            first = None


def split_name(name: str) -> tuple[str, str]:
    """("dir/000123", "seg.png") for "dir/000123.seg.png": the key ends at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _is_field(key: str, ext: str) -> bool:
    return bool(ext) and not key.rpartition("/")[2].startswith("__")  # e.g. __index__ is metadata, not a sample


def iter_tar_samples(stream: BinaryIO, url: str, skip: int = 0, at: int = 0) -> Iterator[Sample]:
    """Group consecutive members with the same key into samples, passing over the first ``skip`` samples unread;
    the stream starts at byte ``at`` of the shard."""
    state = {"key": None, "count": 0}

    def wanted(name: str) -> bool:
        key, ext = split_name(name)
        if not _is_field(key, ext):
            return False
        if key != state["key"]:
            state["key"], state["count"] = key, state["count"] + 1
        return state["count"] > skip

    current: Sample | None = None
    try:
        for name, data, _ in iter_members(stream, url, wanted, at):
            if data is None:
                continue
            key, ext = split_name(name)
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": url}
            current[ext] = data
    except ShardCorrupt:
        if current is not None and state["key"] != current["__key__"]:  # damage in the next sample's member
            yield current
        raise
    if current is not None:
        yield current


def sample_offsets(stream: BinaryIO, url: str) -> list[int]:
    """Where each sample of a tar stream starts (its first member's first header) and where the last one ends: a
    shard's .idx. Reads only the headers' blocks' worth of data it must pass over."""
    offsets: list[int] = []
    last, seen = None, set()
    members = iter_members(stream, url, lambda name: False)
    while True:
        try:
            name, _, first = next(members)
        except StopIteration as done:
            return [*offsets, done.value]
        key, ext = split_name(name)
        if _is_field(key, ext) and key != last:
            if key in seen:  # its fields would be read as two samples, each missing the other's members
                raise DataError(
                    f"{url}: the members of sample {key!r} are not next to each other (a directory archived unsorted):"
                    " write the tar with its members sorted (GNU tar --sort=name), or with `vegan-scale shards`"
                )
            offsets.append(first)
            last = key
            seen.add(key)


def read_samples(
    url: str, backoff: Backoff, skip: int = 0, take: int | None = None, offsets: Sequence[int] | None = None
) -> Iterator[Sample]:
    """Samples ``skip`` to ``skip + take`` of a shard, resuming after transient failures with backoff. With the
    shard's sample ``offsets`` (its .idx), a local file or URL is entered at the first sample wanted, so that no
    byte before it is read; otherwise the samples before it are passed over."""
    delivered = 0

    def position() -> str:
        return f"sample {skip + delivered}"

    if take is not None and take <= 0:
        return
    for attempt in _attempts(url, backoff, position):
        start = offsets[skip + delivered] if offsets is not None else 0
        end = offsets[skip + take] if offsets is not None and take is not None else None
        with attempt:
            stream, positioned = open_url(url, start, end)
            entered = offsets is not None and positioned  # at the first sample wanted
            with contextlib.closing(stream):
                unread = 0 if entered else skip + delivered
                for sample in iter_tar_samples(stream, url, unread, start if entered else 0):
                    delivered += 1
                    yield sample
                    if delivered == take:
                        return


def read_range(url: str, start: int, end: int, backoff: Backoff) -> bytearray | None:
    """Bytes [start, end) of a shard (fewer where it ends sooner) in one request, resumed after the bytes already
    received where a transient failure cuts it; None where the source cannot be entered at ``start`` (a ``pipe:``
    command, a server that ignores Range). Read into one buffer: no copy beyond the one from the source."""
    got, filled = bytearray(end - start), 0

    def position() -> str:
        return f"byte {start + filled}"

    for attempt in _attempts(url, backoff, position):
        with attempt:
            stream, positioned = open_url(url, start + filled, end)
            with contextlib.closing(stream):
                if not positioned:
                    return None
                while filled < len(got) and (n := _read_into(stream, memoryview(got)[filled:])):
                    filled += n
    return got if filled == len(got) else got[:filled]


def _read_into(stream: Any, view: memoryview) -> int:
    """Bytes read into ``view`` (0 at the end): straight into it where the stream can, else copied."""
    if hasattr(stream, "readinto"):
        return stream.readinto(view)
    chunk = stream.read(min(len(view), CHUNK))
    view[: len(chunk)] = chunk
    return len(chunk)


def _attempts(url: str, backoff: Backoff, position: Callable[[], str]) -> Iterator[retry.Attempt]:
    """The tries of a read of ``url``: each transient failure logged with where the next try starts
    (``position()``), a DataError naming the shard when they run out."""

    def retrying_from(error: Exception, wait: float) -> None:
        log.warning("shard %s: %s; retrying in %.1f s from %s", url, error, wait, position())

    def give_up(error: Exception) -> DataError:
        return DataError(f"shard {url}: giving up after {backoff.attempts} attempts: {error}")

    return retry.retrying(backoff, _transient, retrying_from, give_up)


def _transient(error: Exception) -> bool:
    return isinstance(error, (TransientReadError, OSError, http.client.HTTPException))
