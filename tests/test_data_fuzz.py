"""Damaged shards, as storage and transfers damage them: every header field is checked against the bytes before it
is used, and damage is bad data like any other (a named error, or a counted skip), never another exception or a
hang. Targeted cases for each header field, then a seeded fuzz over real shard bytes."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest

from tests.shardkit import header_offsets, set_header_field
from vegan_scale.data.decode import SKIP_REASONS, SampleError, decode_sample
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.data.shardio import ShardCorrupt, read_samples
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

ONCE = Backoff(attempts=1)
SHAPE = (1, 12, 12)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The bytes of one real 20-sample shard per image format, written by `vegan-scale shards`' writer."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 12, 12), dtype=np.uint8)
    out = {}
    for fmt in ("npy", "png"):
        directory = tmp_path_factory.mktemp(fmt)
        write_shards(ArraySource(images, np.arange(20) % 10), directory, prefix="s", fmt=fmt, samples_per_shard=20)
        out[fmt] = (directory / "s-000000.tar").read_bytes()
    return out


def read_all(path: Path) -> list:
    """Every sample of a shard, decoded, as training reads it with data.on_error=raise."""
    return [decode_sample(sample, SHAPE) for sample in read_samples(str(path), ONCE)]


def damaged(tmp_path: Path, raw: bytes | bytearray, name: str = "bad.tar") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(raw))
    return path


SIZE, MTIME = 124, 136  # offsets of the size and mtime fields in a tar header


@pytest.mark.parametrize(
    ("field", "why"),
    [
        (b"\x80" + (10**12).to_bytes(11, "big"), "member 1000000000000 bytes long"),  # base-256, far past the file
        (b"\xff" + b"\xff" * 11, "member -1 bytes long"),  # base-256 negative
        (b"\x81" + bytes(11), "lead byte"),  # neither base-256 nor octal
        (b"00000000009\0", "not octal"),
        (b"-0000000001\0", "not octal"),
        (b"0_000000001\0", "not octal"),
        (b"00077777777\0", "truncated"),  # octal, 16 MiB: larger than the file, below the member limit
    ],
)
def test_damaged_size_field_is_named_with_shard_and_offset(shards, tmp_path, field, why):
    raw = bytearray(shards["npy"])
    header = header_offsets(bytes(raw))[4]  # sample 2's image
    set_header_field(raw, header, SIZE, field)
    path = damaged(tmp_path, raw)
    with pytest.raises(ShardCorrupt, match=why) as info:
        read_all(path)
    assert str(path) in str(info.value) and f"byte {header}" in str(info.value)


def test_base_256_size_of_a_real_member_is_read(shards, tmp_path):
    """A size in base-256 (as GNU tar writes sizes over 8 GiB) that is right is read as the member's size."""
    raw = bytearray(shards["npy"])
    header = header_offsets(bytes(raw))[0]
    size = int(raw[header + SIZE : header + SIZE + 11], 8)
    set_header_field(raw, header, SIZE, b"\x80" + size.to_bytes(11, "big"))
    assert len(read_all(damaged(tmp_path, raw))) == 20


def test_bad_checksum_is_a_malformed_header(shards, tmp_path):
    raw = bytearray(shards["npy"])
    header = header_offsets(bytes(raw))[6]
    raw[header + MTIME] ^= 0x01  # one bit of a field nothing reads: only the checksum can tell
    with pytest.raises(ShardCorrupt, match=rf"malformed tar header .*checksum.* at byte {header}"):
        read_all(damaged(tmp_path, raw))


def test_zero_size_member_followed_by_garbage(shards, tmp_path):
    """A member whose size says 0 leaves its bytes to be read as the next header: garbage, named, not parsed."""
    raw = bytearray(shards["npy"])
    header = header_offsets(bytes(raw))[2]
    set_header_field(raw, header, SIZE, b"00000000000\0")
    with pytest.raises(ShardCorrupt, match=rf"at byte {header + 512}"):
        read_all(damaged(tmp_path, raw))


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One random damage: bytes flipped in a header or a payload, a cut, bytes inserted or removed, a header's
    numeric field rewritten (checksum fixed), or a block of zeros or garbage."""
    data = bytearray(raw)
    headers = header_offsets(raw)
    kind = rng.randrange(6)
    if kind == 0:  # a few bytes flipped inside a header
        at = rng.choice(headers) + rng.randrange(512)
        for i in range(rng.randint(1, 4)):
            data[min(at + i, len(data) - 1)] ^= rng.randrange(1, 256)
    elif kind == 1:  # bytes flipped anywhere (mostly payloads)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
    elif kind == 2:  # cut short
        del data[rng.randrange(len(data)) :]
    elif kind == 3:  # bytes inserted or removed: everything after shifts
        at = rng.randrange(len(data))
        if rng.random() < 0.5:
            data[at:at] = rng.randbytes(rng.randint(1, 600))
        else:
            del data[at : at + rng.randint(1, 600)]
    elif kind == 4:  # a numeric field rewritten with a valid checksum
        header, start = rng.choice(headers), rng.choice([100, 108, 116, 124, 136])
        width = 12 if start >= 124 else 8
        value = rng.choice([rng.randbytes(width), b"\x80" + rng.randbytes(width - 1), b"\xff" * width])
        set_header_field(data, header, start, value)
    else:  # a block overwritten with zeros or garbage
        at = rng.randrange(len(data))
        data[at : at + 512] = bytes(512) if rng.random() < 0.5 else rng.randbytes(512)
    return bytes(data)


@pytest.mark.timeout(120)
def test_fuzzed_shards_give_named_errors_or_clean_reads(shards, tmp_path):
    """400 seeded mutations of real shard bytes (npy and png): reading and decoding each either succeeds or raises a
    DataError naming the shard, within a second of CPU time (a loaded machine stretches wall time, not work: the
    limit catches a size field read as gigabytes to walk); nothing else escapes, nothing hangs (the test's timeout)."""
    rng, outcomes = random.Random(1234), {"read": 0, "ShardCorrupt": 0, "SampleError": 0, "DataError": 0}
    for case in range(400):
        fmt = "npy" if case % 2 else "png"
        path = damaged(tmp_path, mutate(shards[fmt], rng), f"case{case}.tar")
        start = time.process_time()
        try:
            read_all(path)
            outcomes["read"] += 1
        except DataError as e:
            assert str(path) in str(e), f"case {case}: {e}"
            kind = type(e).__name__
            outcomes[kind if kind in outcomes else "DataError"] += 1
        assert time.process_time() - start < 1.0, f"case {case} took {time.process_time() - start:.1f} s of CPU"
    assert outcomes["ShardCorrupt"] > 50 and outcomes["SampleError"] > 10 and outcomes["read"] > 10, outcomes


def test_damaged_headers_are_skipped_and_counted_in_training_order(shards, tmp_path):
    """data.on_error=skip over shards with a damaged header (sample 5's first): the loader yields full batches and
    counts under corrupt_shard the 16 samples lost: the rest of the shard, and sample 4, whose members a damaged
    header might have continued."""
    directory = tmp_path / "train"
    directory.mkdir()
    sizes = {}
    for i in range(4):
        raw = bytearray(shards["npy"])
        if i == 2:
            set_header_field(raw, header_offsets(bytes(raw))[10], SIZE, b"\x80" + (10**12).to_bytes(11, "big"))
        (directory / f"s-{i:06d}.tar").write_bytes(bytes(raw))
        sizes[f"s-{i:06d}.tar"] = 20
    (directory / "sizes.json").write_text(json.dumps(sizes))
    stream = TrainStream(read_index(str(directory)), SHAPE, batch_size=10, seed=0, on_error="skip", shuffle_buffer=0)
    batches = list(stream.epoch(0))
    assert len(batches) == 8 and all(len(images) == 10 for images, _, _ in batches)
    skipped = dict(zip(SKIP_REASONS, sum(skips for _, _, skips in batches).tolist(), strict=True))
    assert skipped["corrupt_shard"] == 16 and sum(skipped.values()) == 16


def test_sample_errors_are_data_errors():
    assert issubclass(SampleError, DataError) and issubclass(ShardCorrupt, DataError)
