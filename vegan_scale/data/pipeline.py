"""The training input pipeline: webdataset shards to uint8 image batches, reproducible and equal across ranks.

Per epoch, every stage is a function of (seed, epoch, rank, worker):

    shard list --permute(seed, epoch)--> split by rank --> split by worker      (same permutation on every rank)
      --> tar members grouped into samples --> shuffle buffer(seed, epoch, rank, worker)
      --> decode (PNG/JPEG images and integer labels only) --> batches of ``batch_size``, full batches only

Each rank knows every rank's shard share from ``sizes.json``, so all ranks agree without communicating on the
number of batches of the epoch: the smallest rank's count. Every rank stops there, which is what keeps DDP from
hanging on uneven shards; the samples left over are counted in :class:`EpochPlan`, never silently dropped. The
loader is a plain DataLoader over the pipeline and is never passed to ``accelerator.prepare`` (which would shard
it a second time); batches move to the device in the training loop.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import PurePath

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vegan_scale.data.shards import ShardIndex
from vegan_scale.errors import DataError

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
# Members whose only decoder is pickle. They are refused rather than skipped, because a shard that carries them
# was not written for this pipeline and may be hostile.
PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt", "mp", "msgpack")

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 images [B, C, H, W], int64 labels [B] (-1 when unlabelled)


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch."""

    worker_shards: list[list[int]]  # shard indices per loader worker, in reading order
    batches: int  # batches every rank yields this epoch
    dropped: int  # samples of this rank's shards left unread to keep the ranks equal


@dataclass(frozen=True)
class TrainStream:
    """The sequence of training batches of one rank: a deterministic function of the seed and the step."""

    index: ShardIndex
    image_shape: tuple[int, int, int]
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 2000

    def __post_init__(self) -> None:
        readers = self.world_size * max(1, self.num_workers)
        if len(self.index.urls) < readers:
            raise DataError(
                f"{len(self.index.urls)} shard(s) for {self.world_size} process(es) x {max(1, self.num_workers)} "
                f"loader worker(s): every reader needs at least one shard. Write more, smaller shards "
                "(vegan-scale shards ... --samples-per-shard N) or lower data.num_workers"
            )
        if self.plan(0).batches == 0:
            raise DataError(
                f"an epoch of {self.index.num_samples} samples gives no full batch of {self.batch_size} per process; "
                "lower train.global_batch_size or use more data"
            )

    def _shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.index.urls))

    def _split(self, order: np.ndarray, rank: int) -> list[list[int]]:
        mine = order[rank :: self.world_size]
        workers = max(1, self.num_workers)
        return [mine[w::workers].tolist() for w in range(workers)]

    def _full_batches(self, worker_shards: list[list[int]]) -> tuple[int, int]:
        samples = [sum(self.index.counts[i] for i in shards) for shards in worker_shards]
        return sum(n // self.batch_size for n in samples), sum(samples)

    def plan(self, epoch: int) -> EpochPlan:
        order = self._shard_order(epoch)
        batches = min(self._full_batches(self._split(order, r))[0] for r in range(self.world_size))
        mine = self._split(order, self.rank)
        _, samples = self._full_batches(mine)
        return EpochPlan(mine, batches, samples - batches * self.batch_size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches of one epoch, exactly ``plan(epoch).batches`` of them."""
        plan = self.plan(epoch)
        pipeline = wds.DataPipeline(
            _WorkerShards([[self.index.urls[i] for i in shards] for shards in plan.worker_shards]),
            wds.tarfile_to_samples(handler=_raise_data_error),
            _SeededShuffle(self.shuffle_buffer, (self.seed, epoch, self.rank)),
            wds.map(_ImageDecoder(self.image_shape)),
            wds.batched(self.batch_size, collation_fn=_collate, partial=False),
        )
        loader = DataLoader(
            pipeline, batch_size=None, num_workers=self.num_workers, prefetch_factor=4 if self.num_workers else None
        )
        return islice(iter(loader), plan.batches)


class _WorkerShards(IterableDataset):
    """Pipeline source: the shard URLs of the DataLoader worker that iterates it."""

    def __init__(self, per_worker: list[list[str]]) -> None:
        super().__init__()
        self.per_worker = per_worker

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        for url in self.per_worker[info.id if info else 0]:
            yield {"url": url}


class _SeededShuffle:
    """A sample shuffle buffer whose random state depends on (seed, epoch, rank) and the loader worker."""

    def __init__(self, buffer: int, seed: tuple[int, ...]) -> None:
        self.buffer, self.seed = buffer, seed

    def __call__(self, samples: Iterator[dict]) -> Iterator[dict]:
        if self.buffer <= 1:
            return samples
        info = get_worker_info()
        rng = random.Random(repr((*self.seed, info.id if info else 0)))
        return wds.filters.shuffle(self.buffer, initial=self.buffer, rng=rng)(samples)


class _ImageDecoder:
    """Sample dict -> (uint8 image [C, H, W], label); refuses members that would need pickle."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        where = f"shard {sample.get('__url__')}, sample {sample.get('__key__')!r}"
        unsafe = [k for k in sample if k.rsplit(".", 1)[-1].lower() in PICKLE_EXTENSIONS]
        if unsafe:
            raise DataError(
                f"{where}: member(s) {unsafe} would need pickle to decode; refusing the shard. "
                "Shards for vegan_scale hold images (png/jpg) and .cls labels only"
            )
        key = next((k for k in IMAGE_EXTENSIONS if k in sample), None)
        if key is None:
            raise DataError(f"{where}: no image member (expected one of {IMAGE_EXTENSIONS}, found {sorted(sample)})")
        return decode_image(sample[key], self.shape, where), _label(sample, where)


def decode_image(data: bytes, shape: tuple[int, int, int], where: str) -> torch.Tensor:
    """Image bytes to a uint8 [C, H, W] tensor of the expected shape."""
    channels = shape[0]
    try:
        with Image.open(io.BytesIO(data)) as img:
            array = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot decode image ({e})") from None
    tensor = torch.from_numpy(array.copy()).reshape(array.shape[0], array.shape[1], -1).permute(2, 0, 1)
    if tuple(tensor.shape) != tuple(shape):
        raise DataError(
            f"{where}: image is {tuple(tensor.shape)} (C, H, W) but the config expects {tuple(shape)}; "
            "set data.image_size and data.channels to match the shards"
        )
    return tensor


def _label(sample: dict, where: str) -> int:
    if "cls" not in sample:
        return -1
    try:
        return int(sample["cls"])
    except ValueError:
        raise DataError(f"{where}: label {sample['cls'][:20]!r} is not an integer") from None


def _collate(samples: list[tuple[torch.Tensor, int]]) -> Batch:
    images, labels = zip(*samples, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _raise_data_error(exn: Exception) -> bool:
    url = next((a for a in reversed(exn.args) if isinstance(a, str) and PurePath(a).suffix == ".tar"), "?")
    raise DataError(f"cannot read shard {url}: {exn.args[0] if exn.args else exn}") from exn


def load_images(index: ShardIndex, shape: tuple[int, int, int], limit: int) -> Batch:
    """The first ``limit`` samples of the shards in order, in memory (for evaluation)."""
    samples = wds.DataPipeline(
        wds.SimpleShardList(index.urls),
        wds.tarfile_to_samples(handler=_raise_data_error),
        wds.map(_ImageDecoder(shape)),
    )
    picked = list(islice(iter(samples), limit))
    if not picked:
        raise DataError(f"no samples in {index.urls[0]} ...")
    return _collate(picked)
