"""Writing image datasets as tar shards: deterministic, parallel, bounded by sample count or bytes.

A shard directory holds ``<prefix>-NNNNNN.tar``, ``sizes.json`` (shard name -> sample count, open_clip's
convention) and ``dataset.json`` (image shape, sample count, format, source), and beside each shard its index
``<prefix>-NNNNNN.tar.idx``: the byte offset of every sample and of the end of the last, little-endian uint64, so
that a reader enters a shard at any sample without reading the bytes before it. Each sample is one image member
(``<key>.npy``, ``.png`` or ``.jpg``) and, when labelled, ``<key>.cls`` with the decimal label.

Formats: ``npy`` stores the raw uint8 array and needs no image decoding (the right choice for small images such as
MNIST, where PNG decoding would cost more than training consumes); ``png`` is lossless and compact for photographs;
``jpg`` is the smallest, lossy.

Encoding (and, for image folders, reading, cropping and resizing) runs in ``workers`` processes; shards are
assembled in order by the parent, so the bytes are identical whatever the worker count. Every file is written
under a temporary name and renamed, and shards left from an earlier write with the same prefix are removed, so a
directory never mixes two writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import re
import signal
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vegan_scale import atomic
from vegan_scale.data.index import INFO_FILE, SIZES_FILE, offsets_path
from vegan_scale.errors import ConfigError, DataError

FORMATS = ("npy", "png", "jpg")
JPEG_QUALITY = 95
CHUNK = 256  # samples a pool worker encodes per task


class SampleSource(Protocol):
    """An indexable, picklable collection of (uint8 image [H, W] or [H, W, C], label or None)."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int | None]: ...


@dataclass
class ShardSummary:
    directory: Path
    shards: int
    samples: int
    bytes: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"{self.directory}: {self.shards} shards, {self.samples} samples, {self.bytes / 1e6:.1f} MB "
            f"({self.seconds:.1f} s)"
        )


def encode_image(image: np.ndarray, fmt: str) -> bytes:
    """Bytes of a uint8 image in ``fmt``, with fixed encoder settings so that output is reproducible."""
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    else:
        img = Image.fromarray(image)
        if fmt == "png":
            img.save(buf, format="PNG", compress_level=6)
        else:
            img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


_worker_state: dict[str, Any] = {}


def _init_worker(source: SampleSource, fmt: str, pooled: bool = False) -> None:
    """A worker's source and format. A pool's workers leave Ctrl-C to the parent, which ends the pool: a worker
    interrupted too ended, and the parent waited for its results for ever."""
    _worker_state["source"], _worker_state["fmt"] = source, fmt
    if pooled:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _encode(i: int) -> list[tuple[str, bytes]]:
    image, label = _worker_state["source"][i]
    members = [(_worker_state["fmt"], encode_image(image, _worker_state["fmt"]))]
    if label is not None:
        members.append(("cls", str(int(label)).encode()))
    return members


def _encoded(source: SampleSource, fmt: str, workers: int) -> Iterator[list[tuple[str, bytes]]]:
    """Encoded members of every sample, in order, by at most one worker per sample (a pool starts all its workers
    first: more would only be forked to wait), each given up to ``CHUNK`` samples at a time."""
    workers = min(workers, len(source))
    if workers <= 1:
        _init_worker(source, fmt)
        yield from map(_encode, range(len(source)))
        return
    chunk = min(CHUNK, -(-len(source) // workers))
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (source, fmt, True)) as pool:
        yield from pool.imap(_encode, range(len(source)), chunksize=chunk)


def _member_bytes(data: bytes) -> int:
    return tarfile.BLOCKSIZE + -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _file_bytes(member_bytes: int) -> int:
    """The size of a tar file of members taking ``member_bytes``: two zero blocks end it, and tarfile pads it to
    a whole record."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class _ShardFile:
    """One shard being written under a temporary name."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, atomic.tmp_path(path)
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed by close())
        self.samples = self.bytes = 0
        self.offsets: list[int] = []  # where each sample's first header starts

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        self.offsets.append(self.tar.offset)
        for ext, data in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            with atomic.naming(self.path):  # a full disk: the error names the shard
                self.tar.addfile(info, io.BytesIO(data))
            self.bytes += _member_bytes(data)
        self.samples += 1

    def close(self) -> int:
        """Publish the shard, then its index of sample offsets (the end of the last sample closes the list)."""
        end = self.tar.offset
        with atomic.naming(self.path):
            self.tar.close()
        size = atomic.publish_file(self.tmp, self.path).stat().st_size
        atomic.write_bytes(offsets_path(self.path), np.asarray([*self.offsets, end], dtype="<u8").tobytes())
        return size

    def full(self, members: list[tuple[str, bytes]], samples: int | None, max_bytes: int | None) -> bool:
        """Whether the next sample (``members``) goes to a new shard: this one holds ``samples``, or the file would
        grow past ``max_bytes`` (a sample larger than that alone still gets a shard of its own)."""
        if samples is not None and self.samples >= samples:
            return True
        new_bytes = sum(_member_bytes(data) for _, data in members)
        return max_bytes is not None and self.samples > 0 and _file_bytes(self.bytes + new_bytes) > max_bytes

    def discard(self) -> None:
        """Remove the shard being written: a write that failed leaves no part of it behind."""
        with contextlib.suppress(OSError):  # its last blocks, which a full disk refuses again
            self.tar.close()
        self.tmp.unlink(missing_ok=True)


def write_shards(
    source: SampleSource,
    out_dir: Path,
    *,
    prefix: str,
    fmt: str = "npy",
    samples_per_shard: int | None = 10_000,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    description: str = "",
) -> ShardSummary:
    """Write every sample of ``source`` as shards of at most ``samples_per_shard`` samples and ``max_shard_bytes``."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown shard format {fmt!r}; expected one of {FORMATS}")
    if (samples_per_shard is not None and samples_per_shard < 1) or (
        max_shard_bytes is not None and max_shard_bytes < 1
    ):
        raise ConfigError(  # else every sample would get a shard of its own
            f"a shard holds at least one sample and one byte (got samples_per_shard={samples_per_shard}, "
            f"max_shard_bytes={max_shard_bytes}): pass a positive --samples-per-shard or --max-shard-mb"
        )
    if len(source) == 0:
        raise DataError(f"{description or 'the source'} holds no samples to write")
    start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (SIZES_FILE, INFO_FILE):  # a write that fails midway must not leave the old index over new shards
        (out_dir / name).unlink(missing_ok=True)
    sizes: dict[str, int] = {}
    total_bytes, shape = 0, None
    shard: _ShardFile | None = None
    try:
        for i, members in enumerate(_encoded(source, fmt, workers)):
            if shape is None:
                shape = _chw(source[0][0])
            if shard is None or shard.full(members, samples_per_shard, max_shard_bytes):
                if shard is not None:
                    total_bytes += shard.close()
                shard = _ShardFile(out_dir / f"{prefix}-{len(sizes):06d}.tar")
                sizes[shard.path.name] = 0
            shard.add(f"{i:09d}", members)
            sizes[shard.path.name] += 1
        total_bytes += shard.close()
    except BaseException:  # a source that fails, a full disk, Ctrl-C
        if shard is not None:
            shard.discard()
        raise
    _remove_stale(out_dir, prefix, sizes)
    info = {
        "num_samples": len(source),
        "image_shape": shape,
        "format": fmt,
        "labels": source[0][1] is not None,
        "source": description,
    }
    atomic.write_text(out_dir / SIZES_FILE, json.dumps(sizes, indent=1))
    atomic.write_text(out_dir / INFO_FILE, json.dumps(info, indent=1))
    return ShardSummary(out_dir, len(sizes), len(source), total_bytes, time.perf_counter() - start)


def _chw(image: np.ndarray) -> list[int]:
    return [1, *image.shape] if image.ndim == 2 else [image.shape[2], *image.shape[:2]]


def _remove_stale(out_dir: Path, prefix: str, keep: dict[str, int]) -> None:
    ours = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    for old in out_dir.glob(f"{prefix}-*.tar"):
        if ours.fullmatch(old.name) and old.name not in keep:
            old.unlink()
            offsets_path(old).unlink(missing_ok=True)


def index_shards(directory: Path) -> dict[str, int]:
    """For tar shards written by another tool: read every ``*.tar`` of ``directory`` once (headers only) and write
    each one's .idx and the directory's sizes.json, which the training order needs. Returns the counts."""
    from vegan_scale.data.shardio import sample_offsets

    shards = sorted(directory.glob("*.tar"))
    if not shards:
        raise DataError(f"no *.tar shards in {directory}: give the directory that holds them")
    sizes = {}
    for shard in shards:
        if not shard.is_file():  # a pipe would hold the reading for ever
            raise DataError(f"{shard} is not a regular file (a directory, a pipe or a device): move it away")
        size = shard.stat().st_size
        if size == 0:  # even a tar without members ends in two blocks of zeros
            raise DataError(f"{shard} is empty (0 bytes), not a tar: write it again or remove it")
        with shard.open("rb") as stream:
            offsets = sample_offsets(stream, str(shard))
        if offsets[-1] >= size:  # the members run to the end: no block of zeros closes them
            raise DataError(
                f"{shard} ends without the tar's closing blocks of zeros, right after a member: cut short (a copy "
                "interrupted), its last sample maybe missing members; copy or write it again"
            )
        atomic.write_bytes(offsets_path(shard), np.asarray(offsets, dtype="<u8").tobytes())
        sizes[shard.name] = len(offsets) - 1
    atomic.write_text(directory / SIZES_FILE, json.dumps(sizes, indent=1))
    return sizes
