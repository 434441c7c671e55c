"""Writing image datasets as webdataset tar shards, and reading back their index.

A shard directory holds ``<prefix>-NNNNNN.tar`` files, ``sizes.json`` (shard name -> sample count, the convention
open_clip's loaders read) and ``dataset.json`` (image shape, sample count, source). Each sample is a PNG image
``<key>.png`` and, when labels are given, ``<key>.cls`` holding the decimal label. Output is byte-for-byte
deterministic for the same input (fixed tar metadata and PNG settings), and every file is written under a
temporary name and renamed, so an interrupted run never leaves a shard that looks complete.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from vegan_scale.errors import DataError

SIZES_FILE = "sizes.json"
INFO_FILE = "dataset.json"


@dataclass
class ShardSummary:
    directory: Path
    shards: int
    samples: int
    bytes: int

    def __str__(self) -> str:
        return f"{self.directory}: {self.shards} shards, {self.samples} samples, {self.bytes / 1e6:.1f} MB"


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W] or [H, W, C] image, with fixed settings so the bytes are reproducible."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shards(
    images: np.ndarray,
    labels: np.ndarray | None,
    out_dir: Path,
    *,
    prefix: str,
    samples_per_shard: int = 10_000,
    source: str = "",
) -> ShardSummary:
    """Write ``images`` (uint8 [N, H, W] or [N, H, W, C]) and optional ``labels`` [N] as shards in ``out_dir``."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} {images.shape}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    total_bytes = 0
    for shard, start in enumerate(range(0, len(images), samples_per_shard)):
        name = f"{prefix}-{shard:06d}.tar"
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0.0, user="vegan", group="vegan") as sink:
            for i in range(start, min(start + samples_per_shard, len(images))):
                sample = {"__key__": f"{i:08d}", "png": encode_png(images[i])}
                if labels is not None:
                    sample["cls"] = str(int(labels[i])).encode()
                sink.write(sample)
        _atomic_write_bytes(out_dir / name, buf.getvalue())
        sizes[name] = min(samples_per_shard, len(images) - start)
        total_bytes += buf.getbuffer().nbytes
    shape = [1, *images.shape[1:]] if images.ndim == 3 else [images.shape[3], *images.shape[1:3]]
    info = {"num_samples": len(images), "image_shape": shape, "labels": labels is not None, "source": source}
    _atomic_write_bytes(out_dir / SIZES_FILE, json.dumps(sizes, indent=1).encode())
    _atomic_write_bytes(out_dir / INFO_FILE, json.dumps(info, indent=1).encode())
    return ShardSummary(out_dir, len(sizes), len(images), total_bytes)


@dataclass
class ShardIndex:
    """The shards of one split: their URLs, sample counts and image shape (channels, height, width)."""

    urls: list[str]
    counts: list[int]
    image_shape: tuple[int, int, int] | None

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def read_index(spec: str) -> ShardIndex:
    """The shards named by ``spec``: a directory holding sizes.json, or a brace pattern of tar files whose
    directory holds a sizes.json that lists them."""
    path = Path(spec)
    # A missing directory is reported as such, not as a missing sizes.json in its parent.
    is_pattern = path.suffix == ".tar" and not path.is_dir()
    directory = path.parent if is_pattern else path
    sizes_path = directory / SIZES_FILE
    if not sizes_path.exists():
        raise DataError(
            f"no shards at {spec}: {sizes_path} is missing. Write shards with "
            "`vegan-scale shards mnist --out DIR` (or `make data`) and point data.train/data.test at DIR"
        )
    try:
        sizes = json.loads(sizes_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{sizes_path} is not valid JSON ({e}); rewrite the shards") from None
    names = [Path(u).name for u in wds.shardlists.expand_urls(spec)] if is_pattern else sorted(sizes)
    missing = [n for n in names if n not in sizes or not (directory / n).exists()]
    if missing:
        raise DataError(
            f"{len(missing)} shard(s) of {spec} are missing or not listed in {sizes_path}: "
            f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; rewrite the shards"
        )
    info_path = directory / INFO_FILE
    shape = tuple(json.loads(info_path.read_text())["image_shape"]) if info_path.exists() else None
    return ShardIndex([str(directory / n) for n in names], [int(sizes[n]) for n in names], shape)
