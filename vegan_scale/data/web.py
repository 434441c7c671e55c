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
    """A response body whose connection ending before Content-Length is a transient failure, not the end of the
    tar (http.client returns b"" there, which would read as a shorter, valid shard)."""

    def __init__(self, response: http.client.HTTPResponse, url: str) -> None:
        self.response, self.url = response, url

    def read(self, n: int = -1) -> bytes:
        data = self.response.read(None if n < 0 else n)
        if not data and n and self.response.length:
            raise TransientReadError(f"the connection for {self.url} closed {self.response.length} bytes early")
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
    sent = re.match(r"bytes (\d+)-", response.headers.get("Content-Range") or "")
    if response.status == 206 and sent and int(sent[1]) != start:
        response.close()
        raise DataError(
            f"shard {url}: the server sent bytes from {sent[1]} when asked for bytes from {start} (its "
            "Content-Range): it does not serve the ranges asked for; serve the shards from one that does"
        )
    return _Body(response, url), start == 0 or response.status == 206  # 200: the server ignored Range
