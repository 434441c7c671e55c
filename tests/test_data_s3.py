"""Shards in an S3-compatible bucket, against a real S3 server (moto's server mode) started on 127.0.0.1: a bucket
directory reads as the same directory on disk does (counts from its sizes.json, epoch mode, the same global
batches), a missing key or sizes.json is named, a connection dropped in the middle of a shard is retried and
resumed without losing or repeating a sample, and `vegan-scale train` trains from the bucket."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.runkit import free_port, run, single, train_args
from tests.shardkit import batch_ids, make_shards
from vegan_scale.data import s3
from vegan_scale.data.faults import TransientReadError
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.errors import DataError

pytest.importorskip("moto", reason="the S3 tests need moto's server (in the dev extra)")

SIZES = [37, 50, 23, 61, 29]
BUCKET = "shards"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """moto's S3 server on a free port; its endpoint URL."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("moto's S3 server did not start") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _use(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}.items():
        monkeypatch.setenv(key, value)
    s3._clients.clear()  # a client per endpoint: the next one reads these


@pytest.fixture
def bucket(server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Shards (with their .idx, sizes.json and dataset.json) in tmp_path/d and uploaded to s3://shards/<test>/d/."""
    import boto3

    _use(server, monkeypatch)
    make_shards(tmp_path / "d", SIZES, offsets=True)
    client = boto3.client("s3", endpoint_url=server)
    if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=BUCKET)
    for file in sorted((tmp_path / "d").iterdir()):
        client.upload_file(str(file), BUCKET, f"{tmp_path.name}/d/{file.name}")
    return tmp_path


def _batches(spec: str, **kwargs) -> list[int]:
    index = read_index(spec)
    ids = []
    for rank in (0, 1):
        stream = TrainStream(index, (1, 8, 8), 6, seed=5, rank=rank, world_size=2, shuffle_buffer=40, **kwargs)
        ids += batch_ids(list(stream.epoch(0)))
    return ids


def test_a_bucket_directory_reads_as_the_directory_on_disk(bucket: Path) -> None:
    remote = f"s3://{BUCKET}/{bucket.name}/d/"
    index = read_index(remote)
    assert index.counts == SIZES and index.image_shape == (1, 8, 8)
    assert index.urls[0] == f"s3://{BUCKET}/{bucket.name}/d/s-000000.tar"
    assert _batches(remote) == _batches(str(bucket / "d"))
    pattern = f"s3://{BUCKET}/{bucket.name}/d/s-{{000000..000004}}.tar"
    assert read_index(pattern).counts == SIZES


def test_missing_objects_are_named(bucket: Path) -> None:
    import boto3

    client = boto3.client("s3")
    client.delete_object(Bucket=BUCKET, Key=f"{bucket.name}/d/s-000002.tar")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/{bucket.name}/d/s-000002.tar does not exist"):
        _batches(f"s3://{BUCKET}/{bucket.name}/d/")
    with pytest.raises(DataError, match=rf"s3://{BUCKET}/nowhere/sizes.json does not exist"):
        read_index(f"s3://{BUCKET}/nowhere/")
    with pytest.raises(DataError, match="does not exist"):
        read_index("s3://no-such-bucket/d/")


class _Proxy:
    """A TCP proxy to the S3 server that cuts one connection after ``after`` bytes of a response larger than that
    (the middle of a shard's body), as a load balancer or a flaky network does, or (``ranges=False``) takes the
    Range header out of every request, as a server that ignores it; every other byte passes."""

    def __init__(self, target: str, after: float = float("inf"), ranges: bool = True) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.target, self.after, self.ranges, self.dropped = (host, int(port)), after, ranges, 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.listener.accept()
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, response: bool) -> None:
        sent = 0
        try:
            while data := source.recv(65536):
                if not response and not self.ranges:
                    data = re.sub(rb"(?im)^range:[^\r\n]*\r\n", b"", data)
                if response and not self.dropped and sent + len(data) > self.after:
                    sink.sendall(data[: self.after - sent])
                    self.dropped += 1
                    break
                sink.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def test_a_connection_dropped_mid_shard_is_resumed(
    bucket: Path, server: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The body of a shard stops after 10 kB: the read is retried from the bytes already received (a Range
    request), and the batches are those of the shards on disk, every sample once."""
    proxy = _Proxy(server, after=10_000)  # inside a shard's body, some samples in (about 2 kB each)
    _use(proxy.url, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="vegan_scale.data"):
        got = _batches(f"s3://{BUCKET}/{bucket.name}/d/")
    assert proxy.dropped == 1
    assert got == _batches(str(bucket / "d")) and len(got) == len(set(got))
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert any(re.match(rf"shard s3://{BUCKET}/.*retrying in .* from byte [1-9]", m) for m in retried), retried


def test_a_server_that_ignores_range_requests_gives_the_same_batches(bucket: Path, server: str, monkeypatch) -> None:
    """An S3-compatible server that ignores Range and sends whole objects: each reader used to take the object's
    first bytes for the stretch it asked for, and trained on repeated and missing samples without a word. The
    answer's Content-Range tells; without one the reader passes over the bytes before its stretch, as over HTTP."""
    proxy = _Proxy(server, ranges=False)
    _use(proxy.url, monkeypatch)
    got = _batches(f"s3://{BUCKET}/{bucket.name}/d/")
    assert got == _batches(str(bucket / "d")) and len(got) == len(set(got))


class _Refusing(BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with the S3 error its server was given."""

    def do_GET(self) -> None:
        status, code = self.server.error  # type: ignore[attr-defined]
        body = f"<?xml version='1.0'?><Error><Code>{code}</Code><Message>refused</Message></Error>".encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (403, "AccessDenied", r"cannot be read with these credentials \(AccessDenied\)"),
        (400, "ExpiredToken", "credentials were refused reading .* \\(ExpiredToken\\): renew or correct them"),
        (403, "InvalidAccessKeyId", "credentials were refused"),
    ],
)
def test_refused_credentials_are_said_at_once(monkeypatch: pytest.MonkeyPatch, status: int, code: str, words: str):
    """Access refused to a bucket's sizes.json read as "sizes.json does not exist; upload a directory", and expired
    or unknown credentials were retried as passing failures before a message that did not say so. Each is said at
    once, naming the object and what to do."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    server.error = (status, code)  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    _use(f"http://127.0.0.1:{server.server_address[1]}", monkeypatch)
    try:
        started = time.monotonic()
        with pytest.raises(DataError, match=words):
            read_index("s3://shards/d/")
        assert time.monotonic() - started < 5
    finally:
        server.shutdown()
        server.server_close()


def test_an_endpoint_that_is_not_a_url_is_said(monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS_ENDPOINT_URL_S3 without its scheme was a ValueError traceback from boto3."""
    _use("127.0.0.1:9000", monkeypatch)
    with pytest.raises(DataError, match=r"AWS_ENDPOINT_URL_S3 .* must be a URL"):
        read_index("s3://shards/d/")


def test_a_server_that_never_answers_is_asked_once_per_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers: one request, failing after one read timeout, is a
    TransientReadError for vegan_scale's own backoff, whose warnings show every try. botocore's retries are off:
    before, it retried once, silently, so each try took two timeouts (a hung endpoint held the start 8 minutes)."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.extend(iter(lambda: listener.accept()[0], None)), daemon=True).start()
    _use(f"http://127.0.0.1:{listener.getsockname()[1]}", monkeypatch)
    monkeypatch.setattr(s3, "TIMEOUT_S", 1)
    try:
        with pytest.raises(TransientReadError, match="Read timeout"):
            s3.fetch("s3://shards/sizes.json")
        assert len(accepted) == 1
    finally:
        listener.close()


@pytest.mark.data
def test_training_from_a_bucket(server: str, mnist_shards: Path, tmp_path: Path, monkeypatch) -> None:
    """`vegan-scale train` with data.train=s3://... (epoch mode: counts from the bucket's sizes.json), its loader
    worker reading from the bucket, trains its steps."""
    import boto3

    _use(server, monkeypatch)  # the training process inherits the endpoint and credentials
    client = boto3.client("s3")
    client.create_bucket(Bucket="mnist")
    train = mnist_shards / "train"
    shards = sorted(p.name for p in train.glob("*.tar"))[:4]
    sizes = json.loads((train / "sizes.json").read_text())
    for name in ["dataset.json", *shards, *(f"{n}.idx" for n in shards)]:
        client.upload_file(str(train / name), "mnist", f"train/{name}")
    client.put_object(Bucket="mnist", Key="train/sizes.json", Body=json.dumps({n: sizes[n] for n in shards}))
    args = train_args(mnist_shards, tmp_path, "s3", "wae_mmd", "data.train=s3://mnist/train/", "train.max_steps=4")
    proc = run(single(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (tmp_path / "mnist" / "s3" / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(line)["step"] for line in lines) == 4
