"""Hand-built shards and independent readers for the data tests (stdlib tarfile, numpy's npy format, PIL).

Images carry their sample id in their first two pixels (id % 256, id // 256), so any batch can be traced back to
the samples it holds. Shards are written here with :mod:`tarfile`, never with the code under test, and a small
HTTP server serves a shard directory with scripted failures.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vegan_scale.data.index import ShardIndex
from vegan_scale.data.order import epoch_order, rank_lanes
from vegan_scale.errors import DataError

Member = tuple[str, bytes]


def id_images(ids: range | list[int], side: int = 8, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 images [n, side, side] (or [..., channels]) of random pixels, a function of (seed, id), whose first
    two pixels encode their id."""
    ids = np.asarray(list(ids), dtype=np.int64)
    shape = (side, side) if channels == 1 else (side, side, channels)
    images = np.stack([np.random.default_rng([seed, int(i)]).integers(0, 256, size=shape, dtype=np.uint8) for i in ids])
    index = ids if channels == 1 else ids[:, None]  # every channel
    images[:, 0, 0] = index % 256
    images[:, 0, 1] = index // 256
    return images


def ids_of(images: torch.Tensor) -> list[int]:
    """The sample ids written by id_images, from a uint8 batch [B, C, H, W]."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def batch_ids(batches: list) -> list[int]:
    return [i for images, _, _ in batches for i in ids_of(images)]


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def image_bytes(array: np.ndarray, fmt: str) -> bytes:
    """PNG or JPEG bytes written by PIL."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format={"png": "PNG", "jpg": "JPEG"}[fmt])
    return buf.getvalue()


def write_tar(path: Path, members: list[Member], fmt: int = tarfile.USTAR_FORMAT) -> str:
    """A tar file written by the standard library."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def read_tar(path: Path) -> list[Member]:
    """(name, bytes) of every regular member, as tarfile reads them."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def group_samples(members: list[Member]) -> list[dict[str, bytes]]:
    """Consecutive members sharing a key (the name up to the first dot of its file name) as one sample."""
    samples: list[dict[str, bytes]] = []
    last = None
    for name, data in members:
        directory, _, base = name.rpartition("/")
        stem, _, ext = base.partition(".")
        key = f"{directory}/{stem}" if directory else stem
        if key != last:
            samples.append({"__key__": key})
            last = key
        samples[-1][ext] = data
    return samples


def sample_members(i: int, image: np.ndarray) -> list[Member]:
    """The members of one good sample: ``<id>.npy`` and ``<id>.cls`` (label id % 10)."""
    return [(f"{i:08d}.npy", npy_bytes(image)), (f"{i:08d}.cls", str(i % 10).encode())]


def write_sizes(directory: Path, sizes: dict[str, int], shape: tuple[int, int, int] | None = None) -> None:
    (directory / "sizes.json").write_text(json.dumps(sizes))
    if shape is not None:
        (directory / "dataset.json").write_text(json.dumps({"image_shape": list(shape)}))


def make_shards(
    directory: Path,
    sizes: list[int],
    side: int = 8,
    prefix: str = "s",
    first_id: int = 0,
    replace: dict[int, list[Member]] | None = None,
    offsets: bool = False,
) -> list[str]:
    """Shards ``<prefix>-NNNNNN.tar`` of the given sample counts (ids from ``first_id``) and their sizes.json, with
    ``offsets``, each shard's ``.tar.idx`` too.

    ``replace`` maps a sample id to the members written instead of its good ones (to plant bad samples)."""
    directory.mkdir(parents=True, exist_ok=True)
    replace = replace or {}
    images = id_images(range(first_id, first_id + sum(sizes)), side)
    paths, start = [], first_id
    for shard, n in enumerate(sizes):
        members = []
        for i in range(start, start + n):
            members += replace.get(i, sample_members(i, images[i - first_id]))
        paths.append(write_tar(directory / f"{prefix}-{shard:06d}.tar", members))
        if offsets:
            write_offsets(Path(paths[-1]))
        start += n
    write_sizes(directory, {Path(p).name: n for p, n in zip(paths, sizes, strict=True)}, (1, side, side))
    return paths


def truncate(path: Path, keep: int) -> None:
    """Cut a file after its first ``keep`` bytes."""
    path.write_bytes(path.read_bytes()[:keep])


class RunsShell:
    """Unpickling this runs ``touch marker``: what a hostile pickle (a shard member, a data file, a checkpoint's
    generator state) would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def epoch_error(batches: Iterator) -> str:
    """The message of the DataError that iterating ``batches`` raises. The loader is released here, by reference
    count: left to a garbage-collection pass, a DataLoader whose worker raised takes seconds to shut down."""
    try:
        for _ in batches:
            pass
    except DataError as e:
        message = str(e)
        e.__traceback__ = None  # its frames hold the loader in a reference cycle
    else:
        raise AssertionError("no DataError")
    del batches
    return message


# --- a local HTTP server with scripted failures ---

Fault = Callable[[SimpleHTTPRequestHandler], bool]  # handles the request itself and returns True, or passes


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, server_state: ShardServer, **kwargs) -> None:
        self.state = server_state
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        with self.state.lock:
            self.state.requests.append(name)
            faults = self.state.faults.get(name)
            fault = faults.pop(0) if faults else None
        if fault is not None and fault.isdigit():  # an HTTP error status
            self.send_error(int(fault))
        elif fault == "half":  # the whole length announced, half the bytes sent, then the connection dropped
            body = Path(self.translate_path(self.path)).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif fault == "endless":  # a body without end, no length announced
            self.send_response(200)
            self.end_headers()
            with contextlib.suppress(OSError):
                while True:
                    self.wfile.write(bytes(65536))
        elif fault == "trickle":  # a byte every 0.1 s, for 3 s: no socket read waits long
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                for _ in range(30):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(0.1)
            self.close_connection = True
        elif fault == "garbled":  # not an HTTP answer
            self.wfile.write(b"garbage\r\n\r\n")
            self.close_connection = True
        elif self.headers.get("Range", "").startswith("bytes="):  # "bytes=N-" or "bytes=N-M" (M included)
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start, end = int(first), int(last) + 1 if last else None
            if fault == "from0":  # a range that starts elsewhere than asked (a CDN aligning it), said truthfully
                start = 0
            with self.state.lock:
                self.state.ranges.append((name, start, end))
            whole = Path(self.translate_path(self.path)).read_bytes()
            if start >= len(whole):  # no byte there, as real servers answer
                self.send_error(416, "range not satisfiable")
                return
            body = whole[start:end]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(whole)}")
            if fault == "unannounced":  # no length: the body ends with the connection, here where a member begins
                with tarfile.open(self.translate_path(self.path)) as tar:
                    cut = next(m.offset for m in tar.getmembers() if m.offset > start + len(body) // 2) - start
                self.end_headers()
                self.wfile.write(body[:cut])
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()

    def log_message(self, *args) -> None:
        pass


class ShardServer:
    """Serves ``root`` on 127.0.0.1; ``faults[name]`` lists what the next requests of that file get: an HTTP
    error status ("503", "404", "403"), "half" (half the body, then the connection drops), "endless" (a body
    without end), "trickle" (a byte at a time), "garbled" (no HTTP answer), "from0" (a range asked for answered
    from byte 0, as its Content-Range says), "unannounced" (a range answered without Content-Length, the connection
    closed where a member begins, halfway) or None (served normally, honouring
    "Range: bytes=N-" and "bytes=N-M"). Records every request."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.faults: dict[str, list[str | None]] = {}
        self.requests: list[str] = []
        self.ranges: list[tuple[str, int, int | None]] = []  # (file, first byte, end or None) of every Range request
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, server_state=self, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def count(self, name: str) -> int:
        return self.requests.count(name)


@contextmanager
def serve(root: Path) -> Iterator[ShardServer]:
    server = ShardServer(root)
    thread = threading.Thread(target=server.httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join(5)


def header_offsets(raw: bytes) -> list[int]:
    """The byte offset of every member header of a plain USTAR archive (no long names), in order."""
    offsets, at = [], 0
    while at + 512 <= len(raw) and raw[at : at + 512] != bytes(512):
        offsets.append(at)
        size = int(raw[at + 124 : at + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        at += 512 + size + (-size % 512)
    return offsets


def read_only_by(index: ShardIndex, global_batch: int, world: int, rank: int, seed: int = 0) -> list[str]:
    """The shards that rank ``rank`` of ``world`` reads whole in the first block of epoch 0 (epoch mode, the default
    shuffle buffer) and no other rank reads at all there."""
    order = epoch_order(index, seed, 0, "epoch", None, global_batch, 2000)
    stretches = [order.lane_pieces(0, rank_lanes(global_batch, world, r)) for r in range(world)]
    others = {url for r, pieces in enumerate(stretches) if r != rank for url, _, _ in pieces}
    counts = dict(zip(order.urls, order.counts, strict=True))
    return [url for url, skip, take in stretches[rank] if (skip, take) == (0, counts[url]) and url not in others]


def write_offsets(path: Path) -> None:
    """``<shard>.idx``: where each sample's first member header starts, and the end of the last member, as
    little-endian uint64, found by walking the headers."""
    raw = path.read_bytes()
    starts, keys = [], []
    for at in header_offsets(raw):
        key = raw[at : at + 100].split(b"\0", 1)[0].decode().split(".", 1)[0]
        if not keys or keys[-1] != key:
            starts.append(at)
            keys.append(key)
    last = header_offsets(raw)[-1]
    size = int(raw[last + 124 : last + 136].split(b"\0", 1)[0].strip() or b"0", 8)
    end = last + 512 + size + (-size % 512)
    path.with_name(path.name + ".idx").write_bytes(np.asarray([*starts, end], dtype="<u8").tobytes())


def set_header_field(raw: bytearray, header: int, start: int, value: bytes) -> None:
    """Overwrite bytes [start, start + len(value)) of the header at ``header`` and make its checksum right again, as
    a writer that meant it would (the damage is then in the field, not in the checksum)."""
    raw[header + start : header + start + len(value)] = value
    block = raw[header : header + 512]
    block[148:156] = b" " * 8
    raw[header + 148 : header + 156] = b"%06o\0 " % sum(block)
