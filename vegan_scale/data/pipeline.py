"""The training input pipeline: the batches of one process, read from shards in the order of
:mod:`vegan_scale.data.order`, equal in content at every world size and worker count.

For each block of an epoch, each reader (a loader worker of a rank) reads its stretch of the epoch's sample
sequence (its lanes; a shard entered at its first sample through its .idx where there is one), decodes it, and
hands over the block whole: for each of the block's batches, its lanes' elements in the block's order. The
DataLoader serves its workers round robin, so K consecutive blocks hold the K pieces of the rank's slice of the
same batches; each step's slice is cut into ``accumulation`` micro-batches of ``batch_size``. A run restarted at
any step, at any world size or worker count, sees the samples an uninterrupted run sees from that step.

Bad data (``on_error``): ``raise`` stops with a DataError naming the shard, sample and problem; ``skip`` counts each
bad sample once under its reason and puts in its place the next good sample of the epoch's sequence after its lane
(:mod:`vegan_scale.data.sequence`): exactly the batches that held bad samples change, the same way at every world
size and worker count, and every rank keeps its batch count. An epoch without one good sample stops the run.

The loader is a plain DataLoader, one for all of a training run's epochs (:meth:`TrainStream.epochs`); it is
never passed to ``accelerator.prepare`` (which would shard it again).
"""

from __future__ import annotations

import atexit
import functools
import logging
import multiprocessing
import os
import signal
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vegan_scale.data.decode import SKIP_REASONS
from vegan_scale.data.index import ShardIndex
from vegan_scale.data.order import EpochOrder, epoch_order, rank_lanes, worker_lanes
from vegan_scale.data.sequence import SequenceReader
from vegan_scale.errors import DataError, DataStallError
from vegan_scale.retry import Backoff
from vegan_scale.stops import SIGNALS

log = logging.getLogger("vegan_scale.data")

MODES = ("epoch", "resampled")
ON_ERROR = ("raise", "skip")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images uint8 [B, C, H, W], labels [B], skips [reasons]


_RELEASES: weakref.WeakSet = weakref.WeakSet()  # the release event of every Readers of this process


@atexit.register  # after multiprocessing's own exit handler, so it runs first
def _release_at_exit() -> None:
    """At the interpreter's exit multiprocessing ends the loader workers still running with SIGTERM and waits for
    them: those of a stream left unfinished (its iterator still referenced) must take it, not hang the exit."""
    for event in list(_RELEASES):
        event.set()


@dataclass(frozen=True)
class Readers:
    """What a run's training process shares with its loader workers, across epochs: the shard each reader opens
    now (an index into ``index.urls``; -1 before its first), so that a stalled read can be named, whether the
    workers are released (may be ended by SIGTERM: see :func:`_leave_stopping_to_the_trainer`), and the workers'
    processes once the loader has started them, so that a thread other than the one reading from them can see one
    end (:meth:`ended`)."""

    reading: Any  # multiprocessing.Array of int64, one per reader of this rank
    released: Any  # multiprocessing.Event
    workers: list = field(default_factory=list)  # multiprocessing.Process, set by the thread that starts the loader

    @classmethod
    def create(cls, count: int) -> Readers:
        readers = cls(multiprocessing.Array("q", [-1] * count, lock=False), multiprocessing.Event())
        _RELEASES.add(readers.released)
        return readers

    def shards(self, urls: list[str]) -> list[str]:
        """What each reader is reading, as 'reader k: shard' lines."""
        return [f"reader {k}: {urls[i]}" if i >= 0 else f"reader {k}: no shard yet" for k, i in enumerate(self.reading)]

    def ended(self) -> DataStallError | None:
        """A loader worker that ended (the kernel's out-of-memory killer, a crash in a native library), named with
        how it ended; None while every worker runs. The thread that reads the loader may not learn of it: a worker
        killed while writing a block to the loader's pipe leaves that thread waiting for the rest of the block."""
        ended = [w for w in self.workers if w.exitcode]
        if not ended:
            return None
        what = "; ".join(f"loader worker pid {w.pid} {_how_it_ended(w.exitcode)}" for w in ended)
        return DataStallError(f"{what}: no more batches can come")


@dataclass(frozen=True)
class TrainStream:
    """One rank's training micro-batches: its slice of the global batches of :mod:`vegan_scale.data.order`, a
    function of (seed, epoch, step) whatever ``world_size`` and ``num_workers`` are."""

    index: ShardIndex
    image_shape: tuple[int, int, int]
    batch_size: int  # the micro-batch
    seed: int
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 2000
    mode: str = "epoch"
    epoch_samples: int | None = None
    on_error: str = "raise"
    retry: Backoff = field(default_factory=Backoff)
    readers: Readers | None = None  # shared with the loader workers; without it, each epoch has its own
    accumulation: int = 1  # micro-batches per step and rank

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.on_error not in ON_ERROR:
            raise ValueError(f"mode must be one of {MODES} and on_error one of {ON_ERROR}")
        if self.mode == "epoch" and any(s.weight != 1 for s in self.index.sources):
            raise DataError(
                "source weights (data.train_weights) need data.mode=resampled; epoch mode reads every sample once"
            )
        share = self.batch_size * self.accumulation
        if self.readers_per_rank > share:
            raise DataError(
                f"{self.readers_per_rank} loader workers for {share} samples per process and step: each worker reads "
                "a whole number of a step's samples; lower data.num_workers"
            )
        if self.order(0).steps == 0:
            raise DataError(
                f"an epoch of {self.order(0).samples} samples holds no global batch of {self.global_batch}; "
                "lower train.global_batch_size or use more data"
            )

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches each rank trains on per epoch."""
        return self.order(0).steps * self.accumulation

    def order(self, epoch: int) -> EpochOrder:
        return epoch_order(
            self.index, self.seed, epoch, self.mode, self.epoch_samples, self.global_batch, self.shuffle_buffer
        )

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's micro-batches ``start``, ``start + 1``, ... of ``epoch``."""
        return (batch for _, batch in self._batches(epoch, start, endless=False))

    def epochs(self, epoch: int, start: int = 0) -> Iterator[tuple[int, Batch]]:
        """The micro-batches from ``start`` of ``epoch`` on, epoch after epoch without end, with their epoch. One
        loader serves every epoch, its workers started once: a loader per epoch forked the training process at each
        epoch's start, which cost the MLP pair's command about 100 ms at every epoch boundary (4% of its time)."""
        return self._batches(epoch, start, endless=True)

    def _batches(self, epoch: int, start: int, endless: bool) -> Iterator[tuple[int, Batch]]:
        step, skip = divmod(start, self.accumulation)
        readers = self.readers or Readers.create(self.readers_per_rank)
        # A DataLoader draws its workers' base seed from the generator it is given, else from torch's global one: a
        # private generator keeps the training process's random stream the same whenever the loader starts.
        loader = DataLoader(
            _Blocks(self, epoch, step, endless),
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=2 if self.num_workers else None,  # blocks: a worker reads the next while one is used
            generator=torch.Generator().manual_seed(self.order(epoch).steps),
            worker_init_fn=functools.partial(_leave_stopping_to_the_trainer, readers.released)
            if self.num_workers
            else None,
        )
        blocks = _start(loader)
        readers.workers[:] = getattr(blocks, "_workers", ())  # none without worker processes
        micro = _micro_batches(_watched(blocks, readers), self.readers_per_rank, self.accumulation)
        return _released(islice(micro, skip, None), None if self.readers else readers.released)


def _micro_batches(blocks: Iterator, workers: int, accumulation: int) -> Iterator[tuple[int, Batch]]:
    """The rank's micro-batches, with their epoch, from its workers' blocks: ``workers`` consecutive blocks are the
    K pieces of the rank's slices of the same batches; each step's slice is cut into ``accumulation``
    micro-batches."""
    while group := list(islice(blocks, workers)):
        images, labels = _joined([g.images for g in group]), _joined([g.labels for g in group])
        counts = torch.tensor([sum(g.counts[r] for g in group) for r in range(len(SKIP_REASONS))], dtype=torch.int64)
        none = torch.zeros_like(counts)
        for t in range(len(images)):
            for m, (x, y) in enumerate(zip(images[t].chunk(accumulation), labels[t].chunk(accumulation), strict=True)):
                yield group[0].epoch, (x, y, counts if t == 0 and m == 0 else none)


def _joined(pieces: list) -> torch.Tensor:
    """The workers' pieces of a group of blocks side by side (dim 1: lanes). One worker: no concatenation (torch.cat
    of a single tensor takes a slow path on CPU)."""
    tensors = [torch.as_tensor(p) for p in pieces]
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def _watched(blocks: Iterator, readers: Readers) -> Iterator:
    """The loader's blocks. A worker that ended (the kernel's out-of-memory killer, a crash in a native library)
    is a DataStallError naming it and how it ended: the DataLoader only says that a worker exited unexpectedly."""
    try:
        yield from blocks
    except (RuntimeError, OSError) as e:  # the DataLoader's words, or a failed hand-over of a block's descriptor
        ended = readers.ended()
        if ended is None:
            raise
        raise ended from e


def _how_it_ended(code: int) -> str:
    if code > 0:
        return f"exited with code {code}"
    name = signal.Signals(-code).name
    if -code == signal.SIGKILL:
        return (
            f"was killed by {name} (what the kernel's out-of-memory killer sends: see `dmesg`; fewer "
            "data.num_workers or a smaller data.shuffle_buffer need less memory)"
        )
    return f"was killed by {name}"


def _released(micro: Iterator[tuple[int, Batch]], release: Any) -> Iterator[tuple[int, Batch]]:
    """The micro-batches; once the caller stops taking them, the loader's workers may be ended (``release``: set
    here; None where the stream's owner releases them, at the end of the run)."""
    try:
        yield from micro
    finally:
        if release is not None:
            release.set()


def _start(loader: DataLoader) -> Iterator:
    """The loader's iterator, its workers forked with the stop signals blocked: a signal sent to the whole job while
    a worker starts waits until the worker has chosen to ignore it.

    The DataLoader also registers its workers for torch's SIGCHLD handler, which, once any loader has started
    workers from the process's main thread, raises in the main thread at whatever it is doing (a step, a checkpoint)
    when a registered worker ends. This stream names its ended workers itself (:func:`_watched`,
    :meth:`Readers.ended`) and stops the run at the next agreement, so its workers are taken off that list."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        blocks = iter(loader)
    else:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            blocks = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if getattr(blocks, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(blocks))
        blocks._worker_pids_set = False
    return blocks


def _leave_stopping_to_the_trainer(release: Any, worker_id: int) -> None:
    """In a loader worker: the signals that stop a job (sent to every process of it by SLURM, launchers and
    ``kill -- -PGID``) are for the training process, which stops at its next check, after a checkpoint that needs
    every batch up to it. So the worker ignores them, except SIGTERM once its training process has released it
    (ending its loader, which terminates workers that do not end on their own)."""

    def on_sigterm(signum: int, frame: object) -> None:
        if release.is_set():
            os._exit(0)

    for sig in SIGNALS:
        signal.signal(sig, on_sigterm if sig == signal.SIGTERM else signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


BY_VALUE_BYTES = 8 << 20  # arrays of a block up to this size cross from a loader worker by value (see _Block)


@dataclass(frozen=True)
class _Block:
    """A worker's share of one block, as it crosses to the training process. Arrays up to BY_VALUE_BYTES go by
    value (NumPy arrays, pickled through the loader's pipe); a tensor would go through a new shared-memory segment,
    whose pages both processes then fault in and whose descriptor is passed over a socket: for a 1.5 MB block of
    28x28 images that cost the worker 1.2 ms and the training process 2-3 ms more than the copy, while a 25 MB
    block is cheaper through shared memory. A worker killed in the middle of writing a block leaves the reading
    thread waiting for the rest of it: the training thread learns of the death from :meth:`Readers.ended`."""

    epoch: int
    images: np.ndarray | torch.Tensor  # uint8 [n, lanes, C, H, W]
    labels: np.ndarray | torch.Tensor  # [n, lanes]
    counts: list[int]  # bad samples by reason

    @classmethod
    def of(cls, epoch: int, images: torch.Tensor, labels: torch.Tensor, counts: list[int]) -> _Block:
        def wire(t: torch.Tensor) -> np.ndarray | torch.Tensor:
            return t.numpy() if t.nbytes <= BY_VALUE_BYTES else t

        return cls(epoch, wire(images), wire(labels), counts)


class _Blocks(IterableDataset):
    """In the loader worker that iterates it, that worker's share of each block from step ``step`` of ``epoch`` on
    (to the epoch's end, or through the following epochs without end), as one :class:`_Block` per block (one
    transfer between processes per block, not per batch): the images [n, lanes, C, H, W] and labels [n, lanes] of
    the block's batches and its bad samples counted by reason (zeros where the run resumes inside the block: it
    counted them before it stopped). Every worker reads the same blocks, so the loader's round robin stays aligned
    across epochs."""

    def __init__(self, stream: TrainStream, epoch: int, step: int, endless: bool) -> None:
        super().__init__()
        self.stream, self.epoch, self.step, self.endless = stream, epoch, step, endless

    def __iter__(self) -> Iterator[_Block]:
        info = get_worker_info()
        worker = info.id if info else 0
        s = self.stream
        lanes = worker_lanes(rank_lanes(s.global_batch, s.world_size, s.rank), s.readers_per_rank, worker)
        urls = s.index.urls
        sizes = dict(zip(urls, s.index.counts, strict=True))

        def entering(url: str) -> None:
            if s.readers is not None:
                s.readers.reading[worker] = urls.index(url)

        epoch, step = self.epoch, self.step
        while True:
            order = s.order(epoch)
            reader = SequenceReader(order, sizes, s.image_shape, s.on_error, s.retry, entering)
            while step < order.steps:
                j, first, length = order.block(step)
                reader.skipped.clear()
                images, labels = reader.lanes(j, lanes, length)  # [lane, element in stored order, ...]
                taken = torch.from_numpy(order.lane_orders(j, lanes))  # [lane, t]: the element batch t takes
                start = step - first
                # [t, lane]: where batch t's element of each lane sits among the block's elements, from batch start
                where = (taken + length * torch.arange(len(lanes))[:, None]).T[start:].flatten()
                images = images.flatten(0, 1).index_select(0, where).view(-1, len(lanes), *images.shape[2:])
                counts = [reader.skipped.get(r, 0) if start == 0 else 0 for r in SKIP_REASONS]
                yield _Block.of(epoch, images, labels.flatten().index_select(0, where).view(-1, len(lanes)), counts)
                step = first + length
            if not self.endless:
                return
            epoch, step = epoch + 1, 0
