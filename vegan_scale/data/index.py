"""Shard lists: which tar files make up a dataset, how many samples each holds, and how sources are weighted.

A data spec is one or more sources separated by ``::`` (open_clip's convention), each one of:

* a local directory written by ``vegan-scale shards`` (it holds ``sizes.json``);
* such a directory in an S3-compatible bucket, ``s3://bucket/prefix/`` (:mod:`vegan_scale.data.s3`);
* a brace pattern of local paths or URLs, ``data/train-{000000..000127}.tar``, ``https://host/d/x-{0..9}.tar``,
  ``s3://bucket/d/x-{0..9}.tar``, ``pipe:aws s3 cp s3://bucket/x-{0..9}.tar -``. Sample counts come from a
  ``sizes.json`` beside the shards (read from the same directory, or fetched from the same URL or bucket
  directory); the training order needs them (``vegan-scale index-shards`` writes one for shards made by another
  tool).

Weights (one per source) set how often resampled mode draws from each source.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import os
import posixpath
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from vegan_scale import retry, stored_json
from vegan_scale.data import s3
from vegan_scale.data.faults import ABSENT_HTTP, REFUSED_HTTP, AccessDenied, TransientReadError
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

log = logging.getLogger("vegan_scale.data")
T = TypeVar("T")
NUMERIC_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")
MAX_SHARDS = 1_000_000  # in one data.train or data.test pattern; the largest public image sets hold about 250,000

SIZES_FILE = "sizes.json"
INFO_FILE = "dataset.json"
OFFSETS_SUFFIX = ".idx"
SOURCE_SEPARATOR = "::"
FETCH_BACKOFF = Backoff(attempts=4)
FETCH_DEADLINE_S = 60.0  # one try at a small file: a server trickling bytes never trips a socket's timeout
MAX_FETCH_BYTES = 256 << 20  # a sizes.json of a million shards is 40 MB, an .idx of a million samples 8 MB
MAX_SHARD_SAMPLES = 1 << 31  # far above any shard (a 1 GB shard of 28x28 images holds 1.3M samples)
HOWTO = "write shards with `vegan-scale shards mnist --out DIR` (or `make data`) and point data.train/data.test at DIR"


@dataclass(frozen=True)
class ShardSource:
    """One source: its shard URLs, their sample counts (None when unknown) and its sampling weight."""

    spec: str
    urls: tuple[str, ...]
    counts: tuple[int, ...] | None
    weight: float = 1.0
    image_shape: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class ShardIndex:
    """All sources of one split."""

    sources: tuple[ShardSource, ...]

    @property
    def urls(self) -> list[str]:
        return [u for s in self.sources for u in s.urls]

    @property
    def counts(self) -> list[int]:
        if not self.has_counts:
            unknown = [s.spec for s in self.sources if s.counts is None]
            raise DataError(
                f"sample counts of {unknown} are unknown (no sizes.json beside the shards); write one with "
                "`vegan-scale index-shards DIRECTORY` where the shards are"
            )
        return [c for s in self.sources for c in s.counts]

    @property
    def has_counts(self) -> bool:
        return all(s.counts is not None for s in self.sources)

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    @property
    def image_shape(self) -> tuple[int, int, int] | None:
        return next((s.image_shape for s in self.sources if s.image_shape is not None), None)


def offsets_path(shard: Path) -> Path:
    """Where a shard's index of sample offsets lies: beside it, ``<shard>.idx``."""
    return shard.with_name(shard.name + OFFSETS_SUFFIX)


def read_offsets(url: str, count: int) -> list[int] | None:
    """The byte offset of each of a shard's ``count`` samples and of their end, from its .idx (local files,
    http(s) URLs and S3 objects), or None where there is none, or where it does not fit the shard (then the
    reader passes over the samples before the ones it wants instead)."""
    end = None  # the shard's size, where it is known
    if url.startswith(("http://", "https://", s3.SCHEME)):
        data = _fetch(url + OFFSETS_SUFFIX)
    elif url.startswith("pipe:"):
        return None
    else:
        shard = Path(url.removeprefix("file://"))
        path = offsets_path(shard)
        if not path.is_file():
            return None
        try:
            made = shard.stat()  # once: its size bounds the offsets, its time dates the .idx
        except OSError:  # the shard is gone: its reader says so
            made = None
        end = made.st_size if made else None
        data = None if made and _older(path, made) else path.read_bytes()
    if data is None:
        return None
    offsets = np.frombuffer(data, dtype="<u8") if len(data) % 8 == 0 else np.zeros(0, dtype="<u8")
    if (
        len(offsets) != count + 1
        or (end is not None and offsets[-1] > end)
        or offsets[0] != 0
        or np.any(offsets[:-1] % 512)
        or np.any(offsets[:-1] >= offsets[1:])
    ):
        log.warning(
            "%s%s does not fit the shard's %d samples; reading the shard from its start", url, OFFSETS_SUFFIX, count
        )
        return None
    return offsets.tolist()


def _older(index: Path, shard: os.stat_result) -> bool:
    """Whether a shard's .idx is older than the shard (``shard``: its stat): the writer writes it after the shard,
    so the shard was written again since (its offsets would point into other samples). The reader then reads from
    the shard's start, which is slower, never wrong."""
    if index.stat().st_mtime < shard.st_mtime:
        log.warning("%s is older than its shard: the shard was written again; reading it from its start", index)
        return True
    return False


def _expand(pattern: str) -> list[str]:
    """The shards a brace pattern names, at most MAX_SHARDS of them: a range mistyped by a few digits
    (``{000000..999999999}``) would take all memory before the first shard was looked for. braceexpand builds each
    numeric range whole and combines them lazily, so the ranges are measured first and the combinations cut."""
    import braceexpand

    ranges = NUMERIC_RANGE.findall(pattern)
    widest = max((abs(int(b) - int(a)) // max(abs(int(step or 1)), 1) + 1 for a, b, step in ranges), default=0)
    names = [] if widest > MAX_SHARDS else list(itertools.islice(braceexpand.braceexpand(pattern), MAX_SHARDS + 1))
    if widest > MAX_SHARDS or len(names) > MAX_SHARDS:
        raise DataError(
            f"{pattern} names more than {MAX_SHARDS:,} shards: check its brace ranges (or write fewer, larger "
            "shards with `vegan-scale shards`)"
        )
    return names


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec.split("{", 1)[0]


def _fetch(url: str, backoff: Backoff = FETCH_BACKOFF) -> bytes | None:
    """A small file over HTTP(S) or from a bucket: None if it does not exist, retried on transient failures."""

    def fetch() -> bytes | None:
        if s3.is_s3(url):
            data = s3.fetch(url, MAX_FETCH_BYTES + 1)
        else:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    data = response.read(MAX_FETCH_BYTES + 1)
            except urllib.error.HTTPError as e:
                if e.code in REFUSED_HTTP:
                    raise AccessDenied.of(url, f"(HTTP {e.code})") from None
                if e.code in ABSENT_HTTP:
                    return None
                raise
        if data is not None and len(data) > MAX_FETCH_BYTES:
            raise DataError(f"{url} is larger than {MAX_FETCH_BYTES >> 20} MiB, so not a shard list or index")
        return data

    return retry.call(
        lambda: _within(FETCH_DEADLINE_S, fetch, url),
        backoff,
        transient=lambda e: isinstance(
            e, (urllib.error.URLError, http.client.HTTPException, OSError, TransientReadError)
        ),
        on_retry=lambda e, wait: log.warning("fetching %s failed (%s); retrying in %.0f s", url, e, wait),
        give_up=lambda e: DataError(f"cannot fetch {url} after {backoff.attempts} attempts: {e}"),
    )


def _within(seconds: float, fn: Callable[[], T], url: str) -> T:
    """``fn()``, or a TransientReadError when it has not returned within ``seconds``: a server that sends a byte
    now and then keeps every socket read under its timeout for ever. ``fn`` runs in a thread of its own, left
    behind (a daemon, blocked on its socket) when it is late."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as e:  # handed to the caller
            outcome.append((False, e))

    worker = threading.Thread(target=run, name=f"fetch {url}", daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        raise TransientReadError(f"{url} did not arrive within {seconds:g} s")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def _fetch_json(url: str) -> object | None:
    data = _fetch(url)
    try:
        return None if data is None else stored_json.loads(data)
    except ValueError as e:
        raise DataError(f"{url} is not valid JSON ({e}); rewrite the shards") from None


def _read_json(path: Path) -> object:
    try:
        return stored_json.load(path)
    except (OSError, ValueError) as e:  # damaged, or a pipe or directory in its place
        raise DataError(f"{path} is not valid JSON ({e}); rewrite the shards") from None


def _image_shape(info: object, where: object) -> tuple[int, ...] | None:
    """The [channels, height, width] a dataset.json records; None without one (``info`` None: not found)."""
    if info is None:
        return None
    shape = info.get("image_shape") if isinstance(info, dict) else None
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and n > 0 for n in shape)):
        raise DataError(f"{where} records no image shape [channels, height, width]; rewrite the shards")
    return tuple(shape)


def _sizes(value: object, where: str) -> dict[str, int]:
    """A sizes.json's content, checked: shard names to non-negative sample counts."""
    if not isinstance(value, dict) or not all(
        isinstance(n, str) and isinstance(c, int) and not isinstance(c, bool) and c >= 0 for n, c in value.items()
    ):
        raise DataError(f"{where} is not a mapping of shard names to sample counts; rewrite the shards")
    huge = next((n for n, c in value.items() if c > MAX_SHARD_SAMPLES), None)
    if huge is not None:  # 10**30 overflowed the order's seeds; a remote shard's bytes are not known to bound it
        raise DataError(
            f"{where} counts {value[huge]} samples in {huge}, more than any shard holds (at most {MAX_SHARD_SAMPLES}): "
            "it is damaged; write it again with `vegan-scale index-shards`"
        )
    return value


def _local_source(spec: str, weight: float, skip_missing: bool) -> ShardSource:
    path = Path(spec)
    pattern = not path.is_dir() and (path.suffix == ".tar" or "{" in spec)
    directory = path.parent if pattern else path
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"  # a file, a pipe: not "missing"
        raise DataError(f"no shards at {spec}: {directory} {what}; {HOWTO}")
    sizes_path = directory / SIZES_FILE
    sizes = _sizes(_read_json(sizes_path), str(sizes_path)) if sizes_path.exists() else None
    if not pattern and sizes is None:
        raise DataError(f"no shards at {spec}: {sizes_path} is missing; {HOWTO}")
    names = [Path(u).name for u in _expand(spec)] if pattern else sorted(sizes)
    outside = [n for n in names if Path(n).name != n or n in (".", "..")]
    if outside:
        raise DataError(
            f"{sizes_path} lists {outside[0]!r}, which is not a file of {directory}: a sizes.json names the shards "
            "beside it; rewrite the shards"
        )
    missing = [n for n in names if not (directory / n).exists()]
    if missing and not skip_missing:
        raise DataError(
            f"{len(missing)} shard(s) of {spec} do not exist: {', '.join(missing[:3])}"
            f"{' ...' if len(missing) > 3 else ''}; rewrite the shards or set data.on_error=skip"
        )
    if missing:
        log.warning("%d shard(s) of %s do not exist and are skipped: %s", len(missing), spec, ", ".join(missing[:3]))
    names = [n for n in names if n not in missing]
    if sizes is not None and any(n not in sizes for n in names):
        unlisted = [n for n in names if n not in sizes]
        raise DataError(f"{sizes_path} does not list {', '.join(unlisted[:3])}; rewrite the shards")
    info_path = directory / INFO_FILE
    shape = _image_shape(_read_json(info_path), info_path) if info_path.exists() else None
    counts = tuple(int(sizes[n]) for n in names) if sizes is not None else None
    # More samples than bytes is damage to the sizes.json (a count of 10**30 overflowed the order's seeds; 10**12
    # made skip mode read ahead without end). A shard cut short, down to nothing, is the reader's to find and
    # data.on_error's to handle, so the bound is a byte a sample.
    for name, count in zip(names, counts or (), strict=False):
        if count > (room := (directory / name).stat().st_size) > 0:
            raise DataError(
                f"{sizes_path} counts {count} samples in {name}, more than its {room} bytes: the sizes.json is "
                f"damaged; write it again with `vegan-scale index-shards {directory}`"
            )
    return ShardSource(spec, tuple(str(directory / n) for n in names), counts, weight, shape)


def _remote_source(spec: str, weight: float) -> ShardSource:
    if s3.is_s3(spec) and "{" not in spec and not spec.endswith(".tar"):
        return _bucket_directory(spec, weight)
    urls = tuple(_expand(spec))
    counts = shape = None
    if spec.startswith(("http://", "https://", s3.SCHEME)):
        base = posixpath.dirname(urls[0])
        sizes = _fetch_json(f"{base}/{SIZES_FILE}")
        if sizes is not None:
            sizes = _sizes(sizes, f"{base}/{SIZES_FILE}")
            names = [posixpath.basename(u) for u in urls]
            unlisted = [n for n in names if n not in sizes]
            if unlisted:
                raise DataError(f"{base}/{SIZES_FILE} does not list {', '.join(unlisted[:3])}")
            counts = tuple(int(sizes[n]) for n in names)
            shape = _image_shape(_fetch_json(f"{base}/{INFO_FILE}"), f"{base}/{INFO_FILE}")
    return ShardSource(spec, urls, counts, weight, shape)


def _bucket_directory(spec: str, weight: float) -> ShardSource:
    """``s3://bucket/prefix/``: the shards its sizes.json lists, as in a local directory."""
    base = spec.rstrip("/")
    s3.split(base)  # a bucket is named
    sizes = _fetch_json(f"{base}/{SIZES_FILE}")
    if sizes is None:
        raise DataError(
            f"no shards at {spec}: {base}/{SIZES_FILE} does not exist; upload a directory written by "
            f"`vegan-scale shards` (aws s3 sync DIR {base}/), or write sizes.json with `vegan-scale index-shards`"
        )
    sizes = _sizes(sizes, f"{base}/{SIZES_FILE}")
    outside = [n for n in sizes if "/" in n or n in (".", "..")]
    if outside:
        raise DataError(f"{base}/{SIZES_FILE} lists {outside[0]!r}, which is not an object beside it")
    shape = _image_shape(_fetch_json(f"{base}/{INFO_FILE}"), f"{base}/{INFO_FILE}")
    names = sorted(sizes)
    return ShardSource(spec, tuple(f"{base}/{n}" for n in names), tuple(sizes[n] for n in names), weight, shape)


def read_index(
    spec: str,
    weights: list[float] | None = None,
    *,
    skip_missing: bool = False,
    image_shape: tuple[int, int, int] | None = None,
    key: str = "the data",
) -> ShardIndex:
    """The shards of ``spec`` (sources separated by ``::``), with one weight per source (default: all 1). With
    ``image_shape``, shards whose dataset.json records another shape are refused, naming the config ``key``."""
    parts = [p for p in spec.split(SOURCE_SEPARATOR) if p.strip()]
    if not parts:
        raise DataError(f"the shard list {spec!r} is empty; {HOWTO}")
    weights = list(weights) if weights else [1.0] * len(parts)
    if len(weights) != len(parts) or any(w <= 0 for w in weights):
        raise DataError(
            f"{len(parts)} data source(s) in {spec!r} but weights {weights}: give one positive weight "
            "per source (data.train_weights)"
        )
    sources = tuple(
        _remote_source(p, w) if _is_url(p) else _local_source(p, w, skip_missing)
        for p, w in zip(parts, weights, strict=True)
    )
    if not any(s.urls for s in sources):
        raise DataError(f"no shards found for {spec!r}; {HOWTO}")
    index = ShardIndex(sources)
    for source in sources:  # each: joined sources of other shapes were refused sample by sample
        if (
            image_shape is not None
            and source.image_shape is not None
            and tuple(source.image_shape) != tuple(image_shape)
        ):
            raise DataError(
                f"{key}={spec} holds images of shape {tuple(source.image_shape)} (C, H, W) in {source.spec} but the "
                f"config says {tuple(image_shape)}; set data.channels and data.image_size to match"
            )
    return index
