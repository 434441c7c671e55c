"""Shard lists: directories, brace patterns, weighted '::' sources, missing pieces, and HTTP sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.shardkit import make_shards, serve
from vegan_scale.data import order
from vegan_scale.data.index import offsets_path, read_index, read_offsets
from vegan_scale.data.order import epoch_order
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

GREY = (1, 28, 28)


def names(urls: list[str]) -> list[str]:
    return [u.rsplit("/", 1)[-1] for u in urls]


def test_directory_and_brace_pattern(tiny_shards):
    """A directory lists every shard in name order; a brace pattern lists just the shards it names."""
    index = read_index(str(tiny_shards / "train"))
    assert names(index.urls) == [f"tiny-train-{i:06d}.tar" for i in range(5)]
    assert index.counts == [100] * 5 and index.num_samples == 500 and index.image_shape == GREY
    part = read_index(str(tiny_shards / "train" / "tiny-train-{000001..000003}.tar"))
    assert names(part.urls) == [f"tiny-train-{i:06d}.tar" for i in (1, 2, 3)]
    assert part.counts == [100] * 3 and part.num_samples == 300 and part.image_shape == GREY


@pytest.mark.parametrize("braces", ["{000000..999999999}", "{0..999}-{0..9999}", "{999999999..0..1}"])
def test_a_brace_pattern_naming_millions_of_shards_is_refused_at_once(tmp_path: Path, braces: str) -> None:
    """A range mistyped by a few digits was expanded whole before the first shard was looked for: memory ran out
    after a minute and a half (the kernel killed the run). More than a million shards are refused by name."""
    with pytest.raises(DataError, match=r"names more than 1,000,000 shards: check its brace ranges"):
        read_index(f"{tmp_path}/s-{braces}.tar")


def test_every_joined_source_is_checked_against_the_configured_shape(tmp_path: Path) -> None:
    """Only the first source with a dataset.json was compared: a grey source joined to an RGB one was refused
    sample by sample in training (skip mode counted each as wrong_shape)."""
    import numpy as np

    from vegan_scale.data.sources import ArraySource
    from vegan_scale.data.write import write_shards

    for name, shape in (("grey", (8, 8, 8)), ("rgb", (8, 8, 8, 3))):
        write_shards(ArraySource(np.zeros(shape, np.uint8)), tmp_path / name, prefix=name)
    spec = f"{tmp_path / 'grey'}::{tmp_path / 'rgb'}"
    with pytest.raises(DataError, match=r"holds images of shape \(3, 8, 8\) \(C, H, W\) in .*rgb but the config"):
        read_index(spec, image_shape=(1, 8, 8), key="data.train")


def test_sources_joined_with_weights(tmp_path):
    """'::' joins sources in order with one weight each; wrong weight counts or non-positive weights are refused."""
    make_shards(tmp_path / "a", [3, 4])
    make_shards(tmp_path / "b", [5])
    spec = f"{tmp_path / 'a'}::{tmp_path / 'b' / 's-{000000..000000}.tar'}"
    index = read_index(spec, [1.0, 3.0])
    assert [s.weight for s in index.sources] == [1.0, 3.0]
    a, b = tmp_path / "a", tmp_path / "b"
    assert index.urls == [str(a / "s-000000.tar"), str(a / "s-000001.tar"), str(b / "s-000000.tar")]
    assert index.counts == [3, 4, 5] and index.num_samples == 12
    assert [s.weight for s in read_index(spec).sources] == [1.0, 1.0]
    for weights in ([1.0], [1.0, 0.0], [1.0, -2.0, 1.0]):
        with pytest.raises(DataError, match="one positive weight per source"):
            read_index(spec, weights)


def test_weights_need_resampled_mode(tmp_path):
    """Weights other than 1 are refused in epoch mode (it reads every sample once) and accepted when resampled."""
    for part in ("a", "b"):
        make_shards(tmp_path / part, [10, 10], first_id=100 * (part == "b"))
    index = read_index(f"{tmp_path / 'a'}::{tmp_path / 'b'}", [1.0, 3.0])
    with pytest.raises(DataError, match=r"data\.mode=resampled"):
        TrainStream(index, (1, 8, 8), 5, 0)
    stream = TrainStream(index, (1, 8, 8), 5, 0, mode="resampled", shuffle_buffer=1)
    assert len(list(stream.epoch(0))) == 40 // 5


def test_missing_directory_and_empty_spec(tmp_path):
    """A missing directory names its sizes.json and how to write shards; an empty list is a DataError."""
    missing = tmp_path / "nope"
    missing.mkdir()
    with pytest.raises(DataError) as info:
        read_index(str(missing))
    assert str(missing / "sizes.json") in str(info.value) and "vegan-scale shards" in str(info.value)
    with pytest.raises(DataError, match="does not exist"):
        read_index(str(tmp_path / "absent"))
    os.mkfifo(tmp_path / "pipe")  # a file or a pipe named by mistake was said not to exist
    (tmp_path / "file").write_text("x")
    for named in ("pipe", "file"):
        with pytest.raises(DataError, match=f"{tmp_path / named} is not a directory"):
            read_index(str(tmp_path / named))
    for spec in ("", "::", " :: "):
        with pytest.raises(DataError, match="empty"):
            read_index(spec)


def test_missing_shard(tiny_shards):
    """A shard listed in sizes.json but absent, or named by a pattern but absent, is named in the error; with
    skip_missing it is left out (and its count with it). Unlisted shards and invalid JSON are refused."""
    (tiny_shards / "train" / "tiny-train-000003.tar").unlink()
    with pytest.raises(DataError, match=r"tiny-train-000003\.tar"):
        read_index(str(tiny_shards / "train"))
    pattern = str(tiny_shards / "train" / "tiny-train-{000002..000004}.tar")
    with pytest.raises(DataError, match=r"tiny-train-000003\.tar"):
        read_index(pattern)
    for spec, expected in ((str(tiny_shards / "train"), [0, 1, 2, 4]), (pattern, [2, 4])):
        index = read_index(spec, skip_missing=True)
        assert names(index.urls) == [f"tiny-train-{i:06d}.tar" for i in expected]
        assert index.counts == [100] * len(expected)
    (tiny_shards / "test" / "tiny-test-000002.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"does not list tiny-test-000002\.tar"):
        read_index(str(tiny_shards / "test" / "tiny-test-{000000..000002}.tar"))
    for damage in (b"{}", b"[]", b'{"image_shape": [1, 28]}', b'{"image_shape": "1x28x28"}'):
        (tiny_shards / "test" / "dataset.json").write_bytes(damage)
        with pytest.raises(DataError, match=r"dataset\.json records no image shape"):
            read_index(str(tiny_shards / "test"))
    for damage in (b"{not json", bytes(range(256)), b"[" * 100_000):  # garbage, not UTF-8, nested too deeply
        (tiny_shards / "test" / "sizes.json").write_bytes(damage)
        with pytest.raises(DataError, match="not valid JSON"):
            read_index(str(tiny_shards / "test"))


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_no_sizes_json_is_refused_with_the_command_that_writes_one(tmp_path, mode):
    """Without sizes.json a pattern's counts are unknown; the training order needs them, so the stream refuses in
    both modes and names `vegan-scale index-shards`."""
    make_shards(tmp_path, [7, 7, 7])
    (tmp_path / "sizes.json").unlink()
    index = read_index(str(tmp_path / "s-{000000..000002}.tar"))
    assert len(index.urls) == 3 and not index.has_counts
    with pytest.raises(DataError, match=r"sizes\.json.*vegan-scale index-shards"):
        index.counts  # noqa: B018
    with pytest.raises(DataError, match=r"vegan-scale index-shards DIRECTORY"):
        TrainStream(index, (1, 8, 8), 4, 0, mode=mode, epoch_samples=30)


def test_http_source_counts_from_sizes_json(tmp_path):
    """An http:// pattern fetches sizes.json and dataset.json from the shards' directory; without them on the
    server, counts and shape are unknown."""
    make_shards(tmp_path / "d", [4, 6, 5])
    make_shards(tmp_path / "bare", [4, 6])
    (tmp_path / "bare" / "sizes.json").unlink()
    (tmp_path / "bare" / "dataset.json").unlink()
    with serve(tmp_path) as server:
        index = read_index(f"{server.url}/d/s-{{000000..000002}}.tar")
        assert index.urls == [f"{server.url}/d/s-{i:06d}.tar" for i in range(3)]
        assert index.counts == [4, 6, 5] and index.image_shape == (1, 8, 8)
        assert set(server.requests) == {"sizes.json", "dataset.json"}  # no shard is opened to index
        bare = read_index(f"{server.url}/bare/s-{{000000..000001}}.tar")
        assert not bare.has_counts and bare.image_shape is None and len(bare.urls) == 2


@pytest.mark.parametrize("name", ["sizes.json", "s-000001.tar.idx"])
def test_a_refused_shard_list_or_index_is_said_not_taken_for_absent(tmp_path: Path, name: str) -> None:
    """A sizes.json or .idx the server refuses (HTTP 403, as a bucket does for a file its reader may not see) was
    taken for absent: "no sizes.json, run index-shards" for a list that exists, a shard read from its start for an
    .idx that exists. Said at once (never retried), naming the file and both remedies, as for S3's AccessDenied."""
    make_shards(tmp_path, [4, 6], offsets=True)
    with serve(tmp_path) as server:
        server.faults[name] = ["403"] * 3
        with pytest.raises(DataError, match=rf"{name} cannot be read \(HTTP 403\): grant read access, or upload"):
            index = read_index(f"{server.url}/s-{{000000..000001}}.tar")
            read_offsets(index.urls[1], index.counts[1])
        assert server.count(name) == 1


def test_local_paths_are_not_urls(tmp_path: Path):
    """A local directory whose name has a colon is still a local source."""
    make_shards(tmp_path / "a:b", [3])
    assert read_index(str(tmp_path / "a:b")).counts == [3]


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/dir.tar", ".."])
def test_sizes_json_naming_files_outside_its_directory_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "sizes.json").write_text(json.dumps({name: 10}))
    with pytest.raises(DataError, match="not a file of"):
        read_index(str(tmp_path))


@pytest.mark.parametrize("sizes", [{"a.tar": -1}, {"a.tar": "10"}, {"a.tar": 1.5}, ["a.tar"]])
def test_sizes_json_with_bad_counts_is_refused(tmp_path: Path, sizes: object) -> None:
    (tmp_path / "a.tar").write_bytes(b"")
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    with pytest.raises(DataError, match="not a mapping of shard names to sample counts"):
        read_index(str(tmp_path))


def test_sizes_json_counting_more_than_a_shard_can_hold_is_refused(tmp_path: Path) -> None:
    """10**30 overflowed the order's seeds (a traceback), 10**12 made skip mode read ahead without end: a count
    beyond what the shard's bytes can hold is damage, named with the command that writes the file again; over
    HTTP, where the bytes are not known, a count beyond any shard's is."""
    make_shards(tmp_path, [5])
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 10**7}))
    with pytest.raises(DataError, match=r"counts 10000000 samples in s-000000.tar, more than its \d+ bytes"):
        read_index(str(tmp_path))
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 10**30}))
    with serve(tmp_path) as server, pytest.raises(DataError, match=r"counts 10{30} samples .*more than any shard"):
        read_index(f"{server.url}/s-000000.tar")


@pytest.mark.parametrize("fault", ["endless", "trickle", "garbled"])
def test_a_server_that_misbehaves_with_a_shard_list_is_named_in_bounded_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """sizes.json over HTTP from a server that sends without end (the process was killed for its memory), a byte at
    a time (a socket's timeout never fired: start-up hung, deaf to SIGTERM) or no HTTP at all (a traceback): a
    DataError naming the file, after the fetch's tries."""
    from vegan_scale.data import index

    monkeypatch.setattr(index, "MAX_FETCH_BYTES", 1 << 20)
    monkeypatch.setattr(index, "FETCH_DEADLINE_S", 1.0)
    make_shards(tmp_path, [5])
    with serve(tmp_path) as server:
        server.faults["sizes.json"] = [fault] * 2
        with pytest.raises(DataError, match=r"sizes\.json"):
            index._fetch(f"{server.url}/sizes.json", Backoff(attempts=2, backoff_s=0.01))
        assert server.count("sizes.json") == (1 if fault == "endless" else 2)


def test_resampled_shards_that_hold_no_samples_are_refused(tmp_path: Path) -> None:
    """Counts all 0 (a damaged sizes.json, or empty shards indexed): resampled mode drew shards forever at start-up,
    at full CPU and deaf to SIGTERM."""
    (tmp_path / "s-000000.tar").write_bytes(bytes(1024))  # a tar without members
    (tmp_path / "sizes.json").write_text(json.dumps({"s-000000.tar": 0}))
    with pytest.raises(DataError, match="hold no samples"):
        epoch_order(read_index(str(tmp_path)), 0, 0, "resampled", 1000, 10, 100)


def test_a_resampled_epoch_of_too_many_shard_draws_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data.epoch_samples=10^12 drew shards one by one at start-up (9 us each: hours), memory growing, deaf to
    SIGTERM. An epoch of more than order.MAX_DRAWS expected draws is refused at once, naming the most it takes."""
    make_shards(tmp_path, [6, 6])
    index = read_index(str(tmp_path))
    with pytest.raises(DataError, match=r"data\.epoch_samples=1000000000000 would draw about 1\.67e\+11 shards"):
        epoch_order(index, 0, 0, "resampled", 10**12, 10, 100)
    monkeypatch.setattr(order, "MAX_DRAWS", 10)
    assert sum(epoch_order(index, 0, 0, "resampled", 60, 10, 100).counts) == 60  # the most it names
    with pytest.raises(DataError, match="use at most 60 "):
        epoch_order(index, 0, 0, "resampled", 61, 10, 100)


def test_an_offsets_index_older_than_its_shard_or_past_its_end_is_not_used(tmp_path: Path) -> None:
    """A shard written again (here: cut short) beside its old .idx: the offsets pointed into other samples, and the
    reader delivered wrong samples without a word. It is read from its start instead (slower, never wrong)."""
    (url,) = make_shards(tmp_path, [6], offsets=True)
    shard, index = Path(url), offsets_path(Path(url))
    offsets = read_offsets(url, 6)
    assert offsets is not None
    os.utime(index, (shard.stat().st_mtime - 10,) * 2)
    assert read_offsets(url, 6) is None
    os.utime(index, (shard.stat().st_mtime + 10,) * 2)
    assert read_offsets(url, 6) is not None
    os.truncate(shard, offsets[-1] - 512)  # the last offset now lies past the end
    os.utime(index, (shard.stat().st_mtime + 10,) * 2)
    assert read_offsets(url, 6) is None


def test_index_shards_of_a_url_says_it_reads_local_directories(capsys: pytest.CaptureFixture) -> None:
    """`vegan-scale index-shards s3://bucket/d/` read the URL as the path s3:/bucket/d ("no *.tar shards")."""
    from vegan_scale.cli_parser import parser

    with pytest.raises(SystemExit) as info:
        parser().parse_args(["index-shards", "s3://bucket/d/"])
    assert info.value.code == 2 and "index-shards reads a local directory" in capsys.readouterr().err
