"""Shards in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, ...), read through boto3, the client S3 users have.

``s3://bucket/prefix/`` (a directory written by ``vegan-scale shards`` and copied up, with its ``sizes.json``) and
``s3://bucket/prefix/x-{000000..000127}.tar`` are sources like local ones: ``sizes.json``, ``dataset.json`` and the
shards' ``.tar.idx`` are read from the bucket, so epoch mode and reads of exactly a rank's samples (HTTP Range
requests) work as they do on a file system. Credentials, region and endpoint come from boto3's usual places
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or a profile, ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL_S3``
or ``AWS_ENDPOINT_URL`` for a server other than AWS).

Failures are told apart as for HTTP: a missing key or bucket, or access refused, is :class:`ShardMissing` at once
(a shard a reader in skip mode passes over; access refused to a sizes.json or .idx is said, not taken for absence);
credentials refused or missing, or an endpoint that is not a URL, is a DataError at once (no retry mends them);
a dropped connection, a timeout, throttling or a 5xx is a :class:`TransientReadError`, which the reader retries
with backoff, resuming after the samples it delivered (botocore's own retries are off: one policy, one log line).
"""

from __future__ import annotations

import os
import re
from typing import Any

from vegan_scale.data.faults import (
    CUT_SHORT,
    AccessDenied,
    ShardError,
    ShardMissing,
    ShortShard,
    TransientReadError,
)
from vegan_scale.errors import DataError

SCHEME = "s3://"
TIMEOUT_S = 60
MISSING = ("NoSuchKey", "NoSuchBucket", "404", "InvalidBucketName")
DENIED = ("403", "AccessDenied")
CREDENTIALS = ("ExpiredToken", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "TokenRefreshRequired")
_clients: dict[int, Any] = {}  # one client per process: loader workers are forked and must not share connections


def is_s3(url: str) -> bool:
    return url.startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``."""
    bucket, _, key = url.removeprefix(SCHEME).partition("/")
    if not bucket:
        raise ShardError(f"{url} names no bucket: write s3://BUCKET/PREFIX/")
    return bucket, key


def _client() -> Any:
    pid = os.getpid()
    if pid not in _clients:
        import boto3
        from botocore.config import Config

        # total_max_attempts: botocore reads a client's max_attempts as retries after the first (1 meant two tries)
        config = Config(retries={"total_max_attempts": 1}, connect_timeout=TIMEOUT_S, read_timeout=TIMEOUT_S)
        _clients[pid] = boto3.session.Session().client("s3", config=config)
    return _clients[pid]


class _Body:
    """An object's body whose connection dropping mid-read is a transient failure (retried from the samples
    already delivered), never a shorter, valid-looking shard."""

    def __init__(self, body: Any, url: str) -> None:
        self.body, self.url = body, url

    def read(self, n: int = -1) -> bytes:
        from botocore.exceptions import BotoCoreError

        try:
            return self.body.read(None if n < 0 else n)
        except (BotoCoreError, OSError) as e:  # IncompleteReadError, ResponseStreamingError, a reset connection
            raise TransientReadError(f"reading {self.url} failed: {e}") from e

    def close(self) -> None:
        self.body.close()


def _failure(error: Exception, url: str) -> Exception:
    """The error a boto3 failure stands for: missing (named), refused or credentials (how to give them, never
    retried: a retry cannot mend them) or transient."""
    from botocore.exceptions import ClientError, NoCredentialsError, ProfileNotFound

    if isinstance(error, NoCredentialsError | ProfileNotFound):
        return DataError(
            f"no AWS credentials to read {url} ({error}): set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or an "
            "AWS_PROFILE that exists"
        )
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in MISSING:
            return ShardMissing(f"{url} does not exist ({code})")
        if code in DENIED:
            return AccessDenied.of(url, f"with these credentials ({code})")
        if code in CREDENTIALS:
            return DataError(f"the AWS credentials were refused reading {url} ({code}): renew or correct them")
        if code == "InvalidRange":  # no byte there: the object ends before the samples its .idx places
            return ShortShard(f"{url} ends before the bytes asked for (InvalidRange): {CUT_SHORT}")
    return TransientReadError(f"S3 request for {url} failed: {error}")


def open_object(url: str, start: int = 0, end: int | None = None) -> tuple[_Body, bool]:
    """(the bytes [start, end) of an object as a stream, whether it starts at byte ``start``): a Range request when
    a part is wanted, which a server may ignore and send the whole object (as HTTP servers may), known by the
    Content-Range of its answer."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split(url)
    ranged = {"Range": f"bytes={start}-{'' if end is None else end - 1}"} if start or end is not None else {}
    try:
        answer = _client().get_object(Bucket=bucket, Key=key, **ranged)
    except (BotoCoreError, ClientError, OSError) as e:
        raise _failure(e, url) from e
    except ValueError as e:  # boto3 refuses an endpoint that is not a URL when it makes the client
        raise DataError(
            f"cannot reach {url}: {e}; AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) must be a URL, e.g. "
            "http://127.0.0.1:9000"
        ) from None
    sent = re.fullmatch(r"bytes (\d+)-\d+/(?:\d+|\*)", answer.get("ContentRange") or "")
    return _Body(answer["Body"], url), start == 0 or (sent is not None and int(sent.group(1)) == start)


def fetch(url: str, limit: int = -1) -> bytes | None:
    """A small object whole (sizes.json, an .idx), or its first ``limit`` bytes; None when it does not exist;
    TransientReadError to retry."""
    try:
        with_body, _ = open_object(url)
    except AccessDenied:
        raise
    except ShardMissing:
        return None
    try:
        return with_body.read(limit)
    finally:
        with_body.close()
