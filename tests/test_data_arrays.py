"""The training reader's fast path (vegan_scale.data.arrays): stretches of evenly laid out shards read as arrays.

Clean shards are compared with the standard library's tar reader and numpy's own .npy loader; damaged ones with
the member-by-member path, whose contract the fast path keeps: for any bytes, it returns exactly what that path
decodes, or nothing (and that path reads the stretch, reporting what is wrong as it always has)."""

from __future__ import annotations

import io
import random
import socket
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vegan_scale.data.sequence as sequence
import vegan_scale.data.web as web
from tests.shardkit import (
    group_samples,
    header_offsets,
    id_images,
    make_shards,
    npy_bytes,
    read_tar,
    sample_members,
    set_header_field,
    write_offsets,
    write_tar,
)
from vegan_scale.data.arrays import read_stretch
from vegan_scale.data.decode import decode_sample
from vegan_scale.data.index import read_index, read_offsets
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.data.shardio import read_samples, sample_offsets
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

ONCE = Backoff(attempts=1)


def independent(path: Path, skip: int, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [skip, skip + take) of a shard by tarfile and numpy.load: images [n, C, H, W], labels (-1: none)."""
    samples = group_samples(read_tar(path))[skip : skip + take]
    arrays = [np.load(io.BytesIO(s["npy"])) for s in samples]
    images = np.stack([a[None] if a.ndim == 2 else a.transpose(2, 0, 1) for a in arrays])
    labels = [int(s["cls"]) if "cls" in s else -1 for s in samples]
    return torch.from_numpy(images), torch.tensor(labels, dtype=torch.int64)


def member_path(path: Path, skip: int, take: int, offsets: list[int], shape: tuple[int, int, int]):
    """What the member-by-member path makes of the stretch: (images, labels) when all ``take`` samples read and
    decode, else the exception or the short count."""
    try:
        items = [decode_sample(s, shape) for s in read_samples(str(path), ONCE, skip, take, offsets)]
    except DataError as e:
        return e
    if len(items) != take:
        return f"{len(items)} samples"
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


@pytest.mark.parametrize("layout", ["writer", "tarfile", "rgb", "no labels", "in a directory"])
def test_clean_stretches_read_as_arrays_equal_tarfile_and_numpy(tmp_path, layout):
    """Shards from `vegan-scale shards`' writer and from the standard library (grey, colour, without labels, keys
    in a directory): every stretch, at shard start, middle and end, is read as arrays, equal to the independent
    reading."""
    n, side = 40, 6
    if layout == "writer":
        images = id_images(range(n), side)
        write_shards(ArraySource(images, np.arange(n) % 10), tmp_path, prefix="s", fmt="npy", samples_per_shard=n)
        path, shape = tmp_path / "s-000000.tar", (1, side, side)
    else:
        channels = 3 if layout == "rgb" else 1
        images = id_images(range(n), side, channels)
        members = [m for i in range(n) for m in sample_members(i, images[i])]
        if layout == "no labels":
            members = [m for m in members if m[0].endswith(".npy")]
        if layout == "in a directory":
            members = [(f"train/{name}", data) for name, data in members]
        path, shape = Path(write_tar(tmp_path / "s.tar", members)), (channels, side, side)
        write_offsets(path)
    offsets = read_offsets(str(path), n)
    for skip, take in ((0, n), (0, 7), (13, 20), (n - 2, 2)):
        got = read_stretch(str(path), skip, take, offsets, shape, ONCE)
        assert got is not None, (skip, take)
        want = independent(path, skip, take)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (layout, skip, take)


def test_layouts_it_does_not_read_are_left_to_the_member_path(tmp_path):
    """PNG images, labels of different lengths (samples not evenly spaced), long names, grey arrays for a colour
    config (the member path converts them), a single sample: None, so that the member path reads them."""
    n, side = 12, 6
    images = id_images(range(n), side)
    write_shards(ArraySource(images, np.arange(n) % 10), tmp_path / "png", prefix="s", fmt="png", samples_per_shard=n)
    png = tmp_path / "png" / "s-000000.tar"
    members = []
    for i in range(n):
        members += [(f"{i:03d}.npy", npy_bytes(images[i])), (f"{i:03d}.cls", str(i * 7).encode())]  # 0 .. 77
    uneven = Path(write_tar(tmp_path / "uneven.tar", members))
    long = Path(
        write_tar(
            tmp_path / "long.tar",
            [(f"{'x' * 120}{i:03d}.npy", npy_bytes(images[i])) for i in range(n)],
            fmt=tarfile.GNU_FORMAT,
        )
    )
    cases = [
        (png, 0, n, (1, side, side)),
        (uneven, 0, n, (1, side, side)),
        (long, 0, n, (1, side, side)),
        (uneven, 0, 2, (3, side, side)),  # its first two samples are evenly spaced: refused for the colour shape
        (long, 3, 1, (1, side, side)),
    ]
    for path, skip, take, shape in cases:
        with open(path, "rb") as f:
            offsets = sample_offsets(f, str(path))
        assert read_stretch(str(path), skip, take, offsets, shape, ONCE) is None, (path.name, skip, take)
    with open(uneven, "rb") as f:
        assert read_stretch(str(uneven), 0, 2, sample_offsets(f, str(uneven)), (1, side, side), ONCE) is not None


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """Damage as storage, transfers and careless writers leave it: a flipped byte anywhere; header fields rewritten
    with their checksum made right again (a key's character, the key of the sample before, in one member or in all
    of a sample's, any field); a label, a .npy header or a pixel changed; a cut."""
    data, headers = bytearray(raw), header_offsets(raw)
    at = rng.choice(headers)

    def key(h: int) -> bytes:
        return bytes(data[h : h + 100]).split(b"\0", 1)[0].split(b".", 1)[0]

    sample = [h for h in headers if key(h) == key(at)] if rng.random() < 0.7 else [at]
    kind = rng.randrange(8)
    if kind == 0:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        position, value = rng.randrange(len(key(at))), rng.choice(b"0123456789./_x")
        for h in sample:
            set_header_field(data, h, position, bytes([value]))
    elif kind == 2:
        before = key(headers[max(0, headers.index(sample[0]) - 1)])
        for h in sample:
            set_header_field(data, h, 0, before)
    elif kind == 3:
        field = rng.choice([(0, 100), (100, 8), (124, 12), (136, 12), (156, 1), (257, 6), (345, 155)])
        value = rng.choice([b"0", b"7", b"\0", b" ", b"x", b"5", b"/", b"."]) * rng.randrange(1, field[1] + 1)
        set_header_field(data, at, field[0] + rng.randrange(field[1] - len(value) + 1), value)
    elif kind == 4:  # a label
        cls = [h for h in headers if bytes(data[h : h + 100]).split(b"\0", 1)[0].endswith(b".cls")]
        data[rng.choice(cls) + 512] = rng.choice(b"0123456789 -+_\n\0x")
    elif kind == 5:  # a .npy header's byte
        data[at + 512 + rng.randrange(80)] = rng.randrange(256)
    elif kind == 6:  # a pixel: no reader can see it, both must agree
        npy = [h for h in headers if bytes(data[h : h + 100]).split(b"\0", 1)[0].endswith(b".npy")]
        data[rng.choice(npy) + 512 + 128 + rng.randrange(144)] ^= 0xFF
    else:
        del data[rng.randrange(len(data)) :]
    return bytes(data)


def test_damaged_stretches_read_as_the_member_path_reads_them_or_not_at_all(tmp_path):
    """600 seeded damages of a real 20-sample shard, each read with the undamaged shard's .idx (as a stale .idx
    beside a damaged shard is): the fast path returns exactly what the member path decodes, or None. Both outcomes
    occur, and damage that leaves the stretch readable (a pixel, an mtime, a key's digits) is read as arrays."""
    n, shape = 20, (1, 12, 12)
    images = np.random.default_rng(0).integers(0, 256, size=(n, 12, 12), dtype=np.uint8)
    write_shards(ArraySource(images, np.arange(n) % 10), tmp_path, prefix="s", fmt="npy", samples_per_shard=n)
    clean = (tmp_path / "s-000000.tar").read_bytes()
    offsets = read_offsets(str(tmp_path / "s-000000.tar"), n)
    rng, outcomes = random.Random(7), {"arrays": 0, "arrays of changed bytes": 0, "left": 0}
    for case in range(600):
        path = tmp_path / "case.tar"
        path.write_bytes(raw := mutate(clean, rng))
        skip = rng.choice([0, 0, 5])
        take = n - skip - rng.choice([0, 3])
        fast = read_stretch(str(path), skip, take, offsets, shape, ONCE)
        ordinary = member_path(path, skip, take, offsets, shape)
        if fast is None:
            outcomes["left"] += 1
            continue
        assert isinstance(ordinary, tuple), f"case {case}: read as arrays, but the member path gives {ordinary}"
        assert torch.equal(fast[0], ordinary[0]) and torch.equal(fast[1], ordinary[1]), f"case {case}"
        outcomes["arrays"] += 1
        stretch = slice(offsets[skip], offsets[skip + take])
        outcomes["arrays of changed bytes"] += raw[stretch] != clean[stretch]
    assert outcomes["left"] > 150 and outcomes["arrays of changed bytes"] > 100, outcomes


def test_training_reads_clean_shards_as_arrays_and_damaged_ones_member_by_member(tmp_path, monkeypatch):
    """An epoch over clean shards with their .idx never parses a member in Python (the member path is made to
    fail); with a damaged sample (skip mode) the batches equal those of a reader without the fast path, the bad
    sample counted and replaced."""
    bad = 23
    make_shards(tmp_path / "clean", [30, 30, 30], offsets=True)
    make_shards(tmp_path / "damaged", [30, 30, 30], offsets=True, replace={bad: [(f"{bad:08d}.npy", b"garbage")]})

    def epoch(directory: str) -> list:
        index = read_index(str(tmp_path / directory))
        s = TrainStream(index, (1, 8, 8), batch_size=10, seed=3, shuffle_buffer=30, on_error="skip")
        return [(x.clone(), y.clone(), c.clone()) for x, y, c in s.epoch(0)]

    def refused(*args, **kwargs):
        raise AssertionError("the member path read a clean shard")

    with monkeypatch.context() as m:
        m.setattr(sequence, "_shard_samples", refused)
        assert len(epoch("clean")) == 9
    fast = epoch("damaged")
    monkeypatch.setattr(sequence, "read_stretch", lambda *args: None)
    slow = epoch("damaged")
    assert sum(int(c.sum()) for _, _, c in fast) == 1
    for (x1, y1, c1), (x2, y2, c2) in zip(fast, slow, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(c1, c2)


def test_a_shard_server_that_never_answers_is_a_named_error_not_a_hang(tmp_path, monkeypatch):
    """A server that accepts connections and never sends a byte: the range read times out, is retried, and gives
    up with a DataError naming the shard, as the member-by-member read does; neither hangs."""
    monkeypatch.setattr(web, "HTTP_TIMEOUT_S", 0.3)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in range(8)], daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/s-000000.tar"
    tries = Backoff(attempts=2, backoff_s=0.01)
    offsets = [0, 2048, 4096, 6144]
    try:
        for read in (
            lambda: read_stretch(url, 0, 3, offsets, (1, 8, 8), tries),
            lambda: list(read_samples(url, tries, 0, 3, offsets)),
        ):
            start = time.monotonic()
            with pytest.raises(DataError, match=r"s-000000\.tar: giving up after 2 attempts"):
                read()
            assert time.monotonic() - start < 5
    finally:
        listener.close()
        for connection in held:
            connection.close()
