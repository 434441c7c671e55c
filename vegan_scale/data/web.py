"""Shards over HTTP(S): a Range request for the bytes wanted, its failures told apart as for the other sources.

A shard that does not exist (HTTP 400/404/410) is :class:`ShardMissing`, one the server refuses (HTTP 401/403)
:class:`AccessDenied`, a range past its end (416) :class:`ShortShard`; a dropped connection, a timeout, HTTP 5xx or
429 are transient (the reader retries them). A server that ignores Range (200) is read from byte 0; one that answers
another range than asked, as its Content-Range says (a CDN aligning ranges), is refused.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from typing import BinaryIO

from vegan_scale.data.faults import (
    ABSENT_HTTP,
    CUT_SHORT,
    REFUSED_HTTP,
    AccessDenied,
    ShardMissing,
    ShortShard,
    TransientReadError,
)
from vegan_scale.errors import DataError

HTTP_TIMEOUT_S = 60.0
PERMANENT_HTTP = (400, *ABSENT_HTTP)  # a shard asked for wrongly or not there: retrying cannot help


class _Body:
    """A response body whose connection ends before its announced length is a transient failure, not the end of the
    tar (http.client returns b"" there, which at a member boundary would read as a shorter, valid shard). The length
    is Content-Length's, else that of the range Content-Range names (a body delimited by the connection's end)."""

    def __init__(self, response: http.client.HTTPResponse, url: str, ranged: int | None) -> None:
        self.response, self.url, self.left = response, url, ranged

    def read(self, n: int = -1) -> bytes:
        data = self.response.read(None if n < 0 else n)
        if self.left is not None:
            self.left -= len(data)
        missing = self.response.length or self.left or 0
        if not data and n and missing > 0:
            raise TransientReadError(f"the connection for {self.url} closed {missing} bytes early")
        return data

    def close(self) -> None:
        self.response.close()


def open_http(url: str, start: int, end: int | None) -> tuple[BinaryIO, bool]:
    """(the body of ``url`` from byte ``start``, to ``end`` when given; whether it starts there)."""
    wanted = f"bytes={start}-{'' if end is None else end - 1}"
    request = urllib.request.Request(url, headers={"Range": wanted} if start or end is not None else {})
    try:
        response = urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code in REFUSED_HTTP:
            raise AccessDenied.of(f"shard {url}", f"(HTTP {e.code})") from None
        if e.code in PERMANENT_HTTP:
            raise ShardMissing(f"shard {url} does not exist (HTTP {e.code})") from None
        if e.code == 416:  # no byte there: the shard ends before the samples its .idx places
            raise ShortShard(f"shard {url} ends before byte {start} (HTTP 416): {CUT_SHORT}") from None
        raise TransientReadError(f"HTTP {e.code} for {url}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        raise TransientReadError(f"cannot reach {url}: {e}") from e
    sent = re.match(r"bytes (\d+)-(\d+)", response.headers.get("Content-Range") or "")
    if response.status == 206 and sent and int(sent[1]) != start:
        response.close()
        raise DataError(
            f"shard {url}: the server sent bytes from {sent[1]} when asked for bytes from {start} (its "
            "Content-Range): it does not serve the ranges asked for; serve the shards from one that does"
        )
    ranged = int(sent[2]) - int(sent[1]) + 1 if response.status == 206 and sent else None
    return _Body(response, url, ranged), start == 0 or response.status == 206  # 200: the server ignored Range
