"""The training input pipeline: shards to uint8 image batches, equal on every rank and reproducible by step.

Per epoch and per reader (one loader worker of one rank), a webdataset pipeline of explicit stages:

    shard ranges (epoch mode) or seeded shard draws (resampled mode)   raw samples; shard errors raise or are counted
      -> shuffle buffer seeded by (seed, epoch, rank, worker)          raw samples
      -> safe decode                                                    (uint8 image [C, H, W], label, skip counts)
      -> window: drop the batches a resumed run has already seen, keep exactly this reader's quota
      -> batches of ``batch_size``                                      (images, labels, skip counts) on the host

Epoch mode: the shard list is permuted by (seed, epoch), identically on every rank, and read as one sequence of
samples. Every rank gets ``b = N // (batch * world)`` batches; rank r, worker k reads a contiguous range of that
sequence (whole shards, plus at most a partial shard at each end, entered without decoding what it skips), so
readers never read the same sample and each gets exactly its quota. The last ``N - b * batch * world`` samples of
the permuted order, fewer than one global batch, are left for that epoch (``EpochPlan.dropped``, logged).

Resampled mode: every reader draws shards with replacement (sources weighted) from a generator seeded by (seed,
epoch, rank, worker) and reads until it has its quota; an epoch is ``epoch_samples`` samples (default: the data
set's size).

Worker k's quota is ``b // K`` batches, plus one for the first ``b % K`` workers, so the DataLoader's round robin
over workers is exact and batch j of an epoch is a known batch of a known worker: ``epoch(e, start=j)`` rebuilds
the epoch and skips what the first j batches consumed, so a resumed run sees the batches an uninterrupted run sees.

Bad data (``on_error``): ``raise`` stops with a DataError naming the shard, sample and problem; ``skip`` drops the
sample or the rest of the shard, counts it under a reason (attached to the batches, summed by the trainer) and,
in epoch mode, tops the reader up with a second, differently shuffled pass over its range so that it still yields
its full quota: ranks never fall out of step.

The loader is a plain DataLoader; it is never passed to ``accelerator.prepare`` (which would shard it again).
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import os
import random
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vegan_scale.data.decode import SKIP_REASONS, SampleError, decode_sample
from vegan_scale.data.index import ShardIndex
from vegan_scale.data.shardio import Sample, ShardError, read_samples
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

log = logging.getLogger("vegan_scale.data")

MODES = ("epoch", "resampled")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # what a job is stopped with (vegan_scale.stops)
ON_ERROR = ("raise", "skip")
MAX_PASSES = 4  # epoch mode, on_error=skip: passes over a reader's range to fill its quota
MAX_BAD_IN_A_ROW = 10_000  # on_error=skip: consecutive bad samples or shards before a reader gives up

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images uint8 [B, C, H, W], labels [B], skips [reasons]


@dataclass(frozen=True)
class ReaderPlan:
    """What one reader (a loader worker of one rank) reads in one epoch."""

    seed: tuple[int, ...]  # (seed, epoch, rank, worker)
    quota: int  # batches it yields
    ranges: tuple[tuple[str, int, int], ...] = ()  # epoch mode: (shard url, samples to skip, samples to take)


@dataclass(frozen=True)
class EpochPlan:
    batches: int  # batches every rank yields this epoch
    dropped: int  # epoch mode: samples of the epoch left unread by every rank together
    readers: tuple[ReaderPlan, ...]  # this rank's readers, by worker id


@dataclass(frozen=True)
class Readers:
    """What a run's training process shares with its loader workers, across epochs: the shard each reader opens
    now (an index into ``index.urls``; -1 before its first), so that a stalled read can be named, and whether the
    workers are released (may be ended by SIGTERM: see :func:`_leave_stopping_to_the_trainer`)."""

    reading: Any  # multiprocessing.Array of int64, one per reader of this rank
    released: Any  # multiprocessing.Event

    @classmethod
    def create(cls, count: int) -> Readers:
        return cls(multiprocessing.Array("q", [-1] * count, lock=False), multiprocessing.Event())

    def shards(self, urls: list[str]) -> list[str]:
        """What each reader is reading, as 'reader k: shard' lines."""
        return [f"reader {k}: {urls[i]}" if i >= 0 else f"reader {k}: no shard yet" for k, i in enumerate(self.reading)]


@dataclass(frozen=True)
class TrainStream:
    """One rank's training batches: a function of (seed, epoch, position) for a fixed world size and worker count."""

    index: ShardIndex
    image_shape: tuple[int, int, int]
    batch_size: int
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

    def __post_init__(self) -> None:
        if self.mode not in MODES or self.on_error not in ON_ERROR:
            raise ValueError(f"mode must be one of {MODES} and on_error one of {ON_ERROR}")
        readers = self.world_size * self.readers_per_rank
        if self.mode == "epoch":
            if any(s.weight != 1 for s in self.index.sources):
                raise DataError(
                    "source weights (data.train_weights) need data.mode=resampled; epoch mode reads every sample once"
                )
            shards = len(self.index.urls)
            if shards < readers:
                raise DataError(
                    f"{shards} shard(s) for {self.world_size} process(es) x {self.readers_per_rank} loader worker(s) "
                    f"= {readers} readers: in epoch mode every reader needs a shard of its own. Use "
                    "data.mode=resampled, write more and smaller shards, or lower data.num_workers"
                )
        if self.batches_per_epoch == 0:
            raise DataError(
                f"an epoch of {self.samples_per_epoch} samples holds no full batch of {self.batch_size} for each of "
                f"{self.world_size} process(es); lower train.global_batch_size or use more data"
            )

    @property
    def readers_per_rank(self) -> int:
        return max(1, self.num_workers)

    @property
    def samples_per_epoch(self) -> int:
        if self.mode == "resampled" and self.epoch_samples:
            return self.epoch_samples
        return self.index.num_samples

    @property
    def batches_per_epoch(self) -> int:
        return self.samples_per_epoch // (self.batch_size * self.world_size)

    def _quotas(self) -> list[int]:
        b, k = self.batches_per_epoch, self.readers_per_rank
        return [b // k + (w < b % k) for w in range(k)]

    def plan(self, epoch: int) -> EpochPlan:
        quotas = self._quotas()
        seeds = [(self.seed, epoch, self.rank, w) for w in range(len(quotas))]
        b = self.batches_per_epoch
        if self.mode == "resampled":
            return EpochPlan(b, 0, tuple(ReaderPlan(s, q) for s, q in zip(seeds, quotas, strict=True)))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.index.urls))
        urls = [self.index.urls[i] for i in order]
        counts = [self.index.counts[i] for i in order]
        start = self.rank * b * self.batch_size
        readers = []
        for s, q in zip(seeds, quotas, strict=True):
            readers.append(ReaderPlan(s, q, _ranges(urls, counts, start, q * self.batch_size)))
            start += q * self.batch_size
        return EpochPlan(b, self.index.num_samples - b * self.batch_size * self.world_size, tuple(readers))

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's batches ``start``, ``start + 1``, ... of ``epoch``: ``plan(epoch).batches - start`` of them."""
        plan = self.plan(epoch)
        k = self.readers_per_rank
        consumed = [start // k + (w < start % k) for w in range(k)]  # batches each reader gave to the first `start`
        # The DataLoader serves its workers round robin from worker 0; batch `start` belongs to reader start % k.
        order = [(start + i) % k for i in range(k)]
        pipeline = wds.DataPipeline(
            _ReaderSamples(self, tuple(plan.readers[o] for o in order), [consumed[o] for o in order]),
            wds.batched(self.batch_size, collation_fn=_collate, partial=False),
        )
        # A DataLoader draws its workers' base seed from the generator it is given, else from torch's global one:
        # a private generator keeps the training process's random stream (prior samples, encoder noise) the same
        # whenever the loader starts, which is what makes a resumed run exact.
        seeds = torch.Generator().manual_seed(hash((self.seed, epoch, self.rank)) % 2**63)
        readers = self.readers or Readers.create(self.readers_per_rank)
        loader = DataLoader(
            pipeline,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=4 if self.num_workers else None,
            generator=seeds,
            worker_init_fn=functools.partial(_leave_stopping_to_the_trainer, readers.released)
            if self.num_workers
            else None,
        )
        return _batches(loader, plan.batches - start, None if self.readers else readers.released)


def _batches(loader: DataLoader, count: int, release: Any) -> Iterator[Batch]:
    """``count`` batches of ``loader``; once the caller stops taking them, its workers may be ended (``release``:
    set here; None where the stream's owner releases them, at the end of the run)."""
    try:
        yield from map(_as_batch, islice(_start(loader), count))
    finally:
        if release is not None:
            release.set()


def _start(loader: DataLoader) -> Iterator:
    """The loader's iterator, its workers forked with the stop signals blocked: a signal sent to the whole job while
    a worker starts waits until the worker has chosen to ignore it."""
    if not loader.num_workers or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _leave_stopping_to_the_trainer(release: Any, worker_id: int) -> None:
    """In a loader worker: the signals that stop a job (sent to every process of it by SLURM, launchers and
    ``kill -- -PGID``) are for the training process, which stops at its next check, after a checkpoint that needs
    every batch up to it. So the worker ignores them, except SIGTERM once its training process has released it
    (ending its loader, which terminates workers that do not end on their own)."""

    def on_sigterm(signum: int, frame: object) -> None:
        if release.is_set():
            os._exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _ranges(urls: list[str], counts: list[int], start: int, length: int) -> tuple[tuple[str, int, int], ...]:
    """The (url, skip, take) pieces of samples [start, start + length) of the concatenated shards."""
    pieces, offset = [], 0
    for url, count in zip(urls, counts, strict=True):
        lo, hi = max(start, offset), min(start + length, offset + count)
        if lo < hi:
            pieces.append((url, lo - offset, hi - lo))
        offset += count
    return tuple(pieces)


Item = tuple[torch.Tensor, int, dict[str, int]]  # image, label, samples skipped (by reason) since the previous item


class _ReaderSamples(IterableDataset):
    """The decoded samples of the loader worker that iterates it, windowed to its share of the epoch."""

    def __init__(self, stream: TrainStream, readers: tuple[ReaderPlan, ...], consumed: list[int]) -> None:
        super().__init__()
        self.stream, self.readers, self.consumed = stream, readers, consumed

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker = info.id if info else 0
        plan, s = self.readers[worker], self.stream
        skip, take = self.consumed[worker] * s.batch_size, (plan.quota - self.consumed[worker]) * s.batch_size
        if s.on_error == "raise":  # nothing is ever dropped, so the window can be cut before decoding
            raw = islice(_shuffled(s, plan, 0), skip, skip + take)
            items = (_decode(sample, s.image_shape, "raise", {}) for sample in raw)
        else:  # decoding decides what counts, so the window is cut after it
            items = islice(_decoded_passes(s, plan), skip, skip + take)
        delivered = 0
        for item in items:
            delivered += 1
            yield item
        if delivered < take:
            raise DataError(
                f"reader {plan.seed[2:]} of epoch {plan.seed[1]} got {skip + delivered} samples but needs "
                f"{skip + take}: the shards hold fewer samples than sizes.json says; rewrite them"
            )


def _shuffled(s: TrainStream, plan: ReaderPlan, pass_: int) -> Iterator[Sample]:
    rng = random.Random(repr((*plan.seed, pass_)))
    samples = _draws(s, plan, rng) if s.mode == "resampled" else _range_samples(s, plan)
    if s.shuffle_buffer <= 1:
        return samples
    return wds.filters.shuffle(s.shuffle_buffer, initial=s.shuffle_buffer, rng=rng)(samples)


def _decoded_passes(s: TrainStream, plan: ReaderPlan) -> Iterator[Item]:
    """Skip mode: decoded samples, dropping bad ones; epoch mode passes over the range again to fill the quota."""
    skipped: dict[str, int] = {}  # bad samples since the last good one, reported with the next good one
    for pass_ in range(MAX_PASSES if s.mode == "epoch" else 1):
        good = bad = in_a_row = 0
        for sample in _shuffled(s, plan, pass_):
            # a later pass meets the first pass's bad samples again: they are counted once
            item = _decode(sample, s.image_shape, "skip", skipped if pass_ == 0 else {})
            if item is None:
                bad, in_a_row = bad + 1, in_a_row + 1
                if in_a_row >= MAX_BAD_IN_A_ROW:  # resampled mode draws for ever: give up on unusable data
                    raise DataError(
                        f"reader {plan.seed[2:]} met {in_a_row} bad samples or shards in a row; the "
                        f"data of {s.index.urls[:2]}... looks unusable (see the warnings above)"
                    )
                continue
            good, in_a_row = good + 1, 0
            yield item[0], item[1], skipped
            skipped = {}
        if good == 0:
            raise DataError(f"no decodable sample in the shard range {plan.ranges} (reader {plan.seed[2:]})")
        log.warning("reader %s skipped %d bad samples; reading its range again to fill its quota", plan.seed[2:], bad)
    raise DataError(f"reader {plan.seed[2:]}: too many bad samples to fill its quota in {MAX_PASSES} passes")


def _range_samples(s: TrainStream, plan: ReaderPlan) -> Iterator[Sample]:
    for url, skip, take in plan.ranges:
        yield from _shard_samples(s, plan, url, skip, take)


def _draws(s: TrainStream, plan: ReaderPlan, rng: random.Random) -> Iterator[Sample]:
    sources = [src for src in s.index.sources if src.urls]  # skip_missing may have left a source without shards
    weights = [src.weight for src in sources]
    while True:
        source = rng.choices(sources, weights)[0]
        yield from _shard_samples(s, plan, rng.choice(source.urls), 0, None)


def _shard_samples(s: TrainStream, plan: ReaderPlan, url: str, skip: int, take: int | None) -> Iterator[Sample]:
    """Samples of one shard; in skip mode a shard error ends the shard and is counted on the next sample."""
    if s.readers is not None:
        s.readers.reading[plan.seed[3]] = s.index.urls.index(url)  # seed: (seed, epoch, rank, worker)
    delivered = 0
    try:
        for sample in read_samples(url, s.retry, skip, take):
            delivered += 1
            yield sample
        if take is not None and delivered < take:
            raise ShortShard(
                f"shard {url} holds {skip + delivered} samples but sizes.json promises at least "
                f"{skip + take}; rewrite the shards or their sizes.json"
            )
    except ShardError as e:
        if s.on_error == "raise":
            raise
        log.warning("skipping the rest of %s: %s", url, e)
        yield {"__key__": None, "__url__": url, "__error__": e.reason}


class ShortShard(ShardError):
    reason = "short_shard"


def _decode(sample: Sample, shape: tuple[int, int, int], on_error: str, skipped: dict[str, int]) -> Item | None:
    if "__error__" in sample:
        skipped[sample["__error__"]] = skipped.get(sample["__error__"], 0) + 1
        return None
    try:
        image, label = decode_sample(sample, shape)
    except SampleError as e:
        if on_error == "raise":
            raise
        skipped[e.reason] = skipped.get(e.reason, 0) + 1
        return None
    return image, label, skipped


def _collate(items: list[Item]) -> tuple[torch.Tensor, list[int], list[int]]:
    """Images as one tensor (one shared-memory transfer from the worker); labels and counts as plain lists, which
    cross the process boundary inline: a tensor each would cost a shared-memory transfer of its own."""
    skips = [0] * len(SKIP_REASONS)
    for _, _, skipped in items:
        for reason, n in skipped.items():
            skips[SKIP_REASONS.index(reason)] += n
    return torch.stack([i[0] for i in items]), [i[1] for i in items], skips


def _as_batch(raw: tuple[torch.Tensor, list[int], list[int]]) -> Batch:
    images, labels, skips = raw
    return images, torch.tensor(labels, dtype=torch.int64), torch.tensor(skips, dtype=torch.int64)


def load_images(
    index: ShardIndex, shape: tuple[int, int, int], limit: int, retry: Backoff | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` samples of the shards in order, decoded in this process (for evaluation)."""
    retry = retry or Backoff()
    samples = (sample for url in index.urls for sample in read_samples(url, retry))
    items = [decode_sample(sample, shape) for sample in islice(samples, limit)]
    if not items:
        raise DataError(f"no samples in {index.urls[0]} ...")
    return torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items], dtype=torch.int64)
