"""Tar parsing against the standard library's tarfile, damaged shards, and retries against a local HTTP server."""

from __future__ import annotations

import io
import logging
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.shardkit import group_samples, make_shards, read_tar, serve, truncate
from vegan_scale.data.shardio import ShardCorrupt, ShardMissing, iter_tar_samples, read_samples
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

FAST = Backoff(attempts=3, backoff_s=0.01)
FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


def as_pairs(samples) -> list[tuple[str, dict[str, bytes]]]:
    return [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in samples]


def members(fmt: str, n: int = 6) -> list[tuple[str, bytes]]:
    """Members under a directory prefix, with names over 100 characters (USTAR's limit for its name field: it
    stores them split into prefix and name, GNU as a long-name member, PAX as an extended header)."""
    rng = np.random.default_rng(0)
    directory = f"{'d' * 60}/é{'e' * 58}"
    out = []
    for i in range(n):
        stem = f"{directory}/{i:05d}" if fmt == "ustar" else f"{directory}/{'x' * 110}{i:05d}"
        size = int(rng.integers(0, 1500))  # empty, partial-block and multi-block members
        out += [(f"{stem}.npy", rng.bytes(size)), (f"{stem}.cls", str(i).encode()), (f"{stem}.seg.png", b"p")]
    return out


def tar_bytes(entries: list[tuple[str, bytes]], fmt: int, directory_entry: bool = True) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        if directory_entry:
            tar.addfile(_dir_info("somedir"))
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def reference(raw: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """What tarfile reads from the same bytes, grouped into samples by key."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        entries = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    return as_pairs(group_samples(entries))


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_iter_tar_samples_matches_tarfile(fmt):
    """USTAR, GNU and PAX tars with long names under a directory read as tarfile reads them, for every skip."""
    raw = tar_bytes(members(fmt), FORMATS[fmt])
    expected = reference(raw)
    assert len(expected) == 6 and len(expected[0][0]) > 100 and set(expected[0][1]) == {"npy", "cls", "seg.png"}
    for skip in (0, 1, 4, 5, 6, 9):
        got = as_pairs(iter_tar_samples(io.BytesIO(raw), "u", skip=skip))
        assert got == expected[skip:], skip


@pytest.mark.parametrize("fmt", ["gnu", "pax"])
def test_long_name_of_a_directory_or_link_is_not_passed_on(fmt):
    """A long name read for a directory or symlink entry names that entry only, not the short-named file after it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=FORMATS[fmt]) as tar:
        tar.addfile(_dir_info("d" * 120))
        link = tarfile.TarInfo("l" * 120)  # no sample's field: one named as a field is refused
        link.type, link.linkname = tarfile.SYMTYPE, "t" * 130
        tar.addfile(link)
        for name in ("000001.npy", "000001.cls", "000002.npy"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(name[5:].encode()))
    expected = reference(buf.getvalue())
    assert expected == [("000001", {"npy": b"1.n", "cls": b"1.c"}), ("000002", {"npy": b"2.n"})]
    assert as_pairs(iter_tar_samples(io.BytesIO(buf.getvalue()), "u")) == expected


def member_offsets(raw: bytes) -> list[tuple[int, int]]:
    """(header offset, data offset) of each member, as tarfile finds them."""
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m.offset, m.offset_data) for m in tar.getmembers()]


@pytest.mark.parametrize("where", ["inside_member", "inside_header"])
def test_truncated_tar_is_corrupt(where):
    """A tar cut inside a member's data or inside a header raises ShardCorrupt naming the shard, after the
    complete samples before the cut."""
    entries = [(f"{i:04d}.{ext}", bytes(700)) for i in range(4) for ext in ("npy", "cls")]
    raw = tar_bytes(entries, tarfile.USTAR_FORMAT, directory_entry=False)
    header, data = member_offsets(raw)[5]  # the second member of sample 2
    cut = data + 300 if where == "inside_member" else header + 200
    got = []
    with pytest.raises(ShardCorrupt, match=r"shard my\.tar is truncated") as info:
        got.extend(s["__key__"] for s in iter_tar_samples(io.BytesIO(raw[:cut]), "my.tar"))
    assert got == ["0000", "0001"]
    assert info.value.reason == "corrupt_shard"


@pytest.mark.parametrize("garbage", [np.random.default_rng(0).bytes(3000), b"this is not a tar file\n" * 100])
def test_garbage_is_corrupt(garbage):
    with pytest.raises(ShardCorrupt, match=r"bad\.tar"):
        list(iter_tar_samples(io.BytesIO(garbage), "bad.tar"))


def test_corrupt_local_shard_is_not_retried(tmp_path):
    """read_samples raises ShardCorrupt at once (a damaged file does not heal), whatever the backoff."""
    path = Path(make_shards(tmp_path, [6])[0])
    truncate(path, 4 * 1024 + 100)
    start = time.perf_counter()
    with pytest.raises(ShardCorrupt):
        list(read_samples(str(path), Backoff(attempts=3, backoff_s=5)))
    assert time.perf_counter() - start < 2


@pytest.fixture()
def shard(tmp_path) -> tuple[Path, list]:
    """One 30-sample shard (16x16 images) and its samples as tarfile reads them."""
    path = Path(make_shards(tmp_path, [30], side=16)[0])
    return path, as_pairs(group_samples(read_tar(path)))


def test_local_file_and_pipe_urls(shard):
    """A path, a file:// URL and a pipe:cat command read the same samples; skip and take select a window."""
    path, expected = shard
    for url in (str(path), f"file://{path}", f"pipe:cat {path}"):
        assert as_pairs(read_samples(url, FAST)) == expected, url
        assert as_pairs(read_samples(url, FAST, skip=2, take=5)) == expected[2:7], url


def test_failing_pipe_command_is_retried_then_fails(tmp_path):
    """A pipe: command that fails is retried and then a DataError, not an empty shard."""
    with pytest.raises(DataError, match="giving up after 3 attempts"):
        list(read_samples(f"pipe:cat {tmp_path / 'absent.tar'}", FAST))


def _read_after_fault(shard: tuple[Path, list], fault: str, caplog: pytest.LogCaptureFixture) -> tuple[list, int]:
    """The samples read over HTTP when the first request meets ``fault``, and the number of requests made."""
    path, _ = shard
    with serve(path.parent) as server:
        server.faults[path.name] = [fault]
        with caplog.at_level(logging.WARNING, logger="vegan_scale.data"):
            got = as_pairs(read_samples(f"{server.url}/{path.name}", FAST))
        return got, server.count(path.name)


def test_http_503_then_served(shard, caplog):
    """A 503 on the first request is retried (a warning is logged) and the samples equal the local read."""
    path, expected = shard
    got, requests = _read_after_fault(shard, "503", caplog)
    assert requests == 2
    assert got == expected
    assert any("503" in r.getMessage() and path.name in r.getMessage() for r in caplog.records)


def test_http_dropped_connection_resumes(shard, caplog):
    """A connection that drops halfway through the body is retried and resumes: no sample lost or repeated."""
    _, expected = shard
    got, requests = _read_after_fault(shard, "half", caplog)
    assert requests == 2
    assert got == expected
    assert any("retrying" in r.getMessage() for r in caplog.records)


def test_http_body_without_length_cut_at_a_member_is_resumed(tmp_path, caplog):
    """A range answered without Content-Length (its body ends with the connection) that ended early exactly where a
    member begins read as a shorter, valid window: its Content-Range says how long it is, so the early end is
    retried and resumed like a dropped connection, no sample lost or repeated."""
    from vegan_scale.data.index import read_offsets

    path = Path(make_shards(tmp_path, [30], side=16, offsets=True)[0])
    expected = as_pairs(read_samples(str(path), FAST))
    with serve(path.parent) as server:
        server.faults[path.name] = ["unannounced"]
        with caplog.at_level(logging.WARNING, logger="vegan_scale.data"):
            got = read_samples(f"{server.url}/{path.name}", FAST, skip=7, take=20, offsets=read_offsets(str(path), 30))
            got = as_pairs(got)
        assert server.count(path.name) == 2 and got == expected[7:27]
    assert any("bytes early" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("status", "words"),
    [("404", r"does not exist \(HTTP 404\)"), ("403", r"cannot be read \(HTTP 403\): grant read access, or upload")],
)
def test_http_404_is_missing_at_once(shard, status: str, words: str) -> None:
    """A 404 is ShardMissing on the first request, with no retry and no backoff; a 403 too (a reader that skips bad
    shards skips it), saying that the server refused it rather than that it does not exist."""
    path, _ = shard
    with serve(path.parent) as server:
        server.faults[path.name] = [status]
        start = time.perf_counter()
        with pytest.raises(ShardMissing, match=words):
            list(read_samples(f"{server.url}/{path.name}", Backoff(attempts=3, backoff_s=5)))
        assert time.perf_counter() - start < 2
        assert server.count(path.name) == 1


def test_http_attempts_exhausted(shard):
    """A shard that answers 503 every time is a DataError after exactly `attempts` requests."""
    path, _ = shard
    with serve(path.parent) as server:
        server.faults[path.name] = ["503"] * 5
        with pytest.raises(DataError, match="giving up after 3 attempts"):
            list(read_samples(f"{server.url}/{path.name}", FAST))
        assert server.count(path.name) == 3


def test_http_window_with_drop(shard):
    """skip and take over HTTP, with the connection dropping once inside the window."""
    path, expected = shard
    with serve(path.parent) as server:
        server.faults[path.name] = ["half"]
        assert as_pairs(read_samples(f"{server.url}/{path.name}", FAST, skip=10, take=15)) == expected[10:25]


def test_a_range_answered_from_elsewhere_is_refused(tmp_path):
    """A server that answers a range from another byte than asked (a CDN aligning ranges), as its Content-Range
    says: the bytes were read as the samples asked for (a "malformed tar header", or the wrong samples trained on)."""
    from vegan_scale.data.index import read_offsets

    path = Path(make_shards(tmp_path, [30], side=16, offsets=True)[0])
    offsets = read_offsets(str(path), 30)
    with serve(path.parent) as server:
        server.faults[path.name] = ["from0"]
        with pytest.raises(DataError, match=r"sent bytes from 0 when asked for bytes from \d+ \(its Content-Range\)"):
            list(read_samples(f"{server.url}/{path.name}", FAST, skip=7, take=9, offsets=offsets))


def index_offsets(path: Path) -> list[int]:
    """A shard's sample offsets as tarfile finds them (an independent index): each sample's first member, then
    the end of the last member."""
    starts, key, end = [], None, 0
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.name.split(".")[0] != key:
                key = member.name.split(".")[0]
                starts.append(member.offset)
            end = member.offset_data + -(-member.size // 512) * 512
    return [*starts, end]


def test_positioned_reads_equal_sequential_reads(tmp_path):
    """With a shard's .idx, a window is read from its first sample to the end of its last and no further (a local
    seek, an HTTP Range request for exactly those bytes) and equals the same window read from the start; an index
    that does not fit the shard is refused."""
    from vegan_scale.data.index import read_offsets

    path = Path(make_shards(tmp_path, [30], side=16)[0])
    expected = as_pairs(read_samples(str(path), FAST, skip=7, take=9))
    path.with_name(path.name + ".idx").write_bytes(np.asarray(index_offsets(path), dtype="<u8").tobytes())
    offsets = read_offsets(str(path), 30)
    assert offsets == index_offsets(path)
    assert as_pairs(read_samples(str(path), FAST, skip=7, take=9, offsets=offsets)) == expected
    with serve(path.parent) as server:
        assert as_pairs(read_samples(f"{server.url}/{path.name}", FAST, skip=7, take=9, offsets=offsets)) == expected
        assert server.ranges == [(path.name, offsets[7], offsets[16])]
    path.with_name(path.name + ".idx").write_bytes(np.asarray([0, 3, 5], dtype="<u8").tobytes())
    assert read_offsets(str(path), 30) is None
