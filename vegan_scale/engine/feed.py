"""The training batches of this process, on the device, epoch after epoch, with loader failures made collective.

A background thread takes the batches from the loader and hands them over through a one-batch queue, so that
waiting for data has a bound: no batch for ``data.stall_timeout_s`` (a read that never returns: a stuck network
file system, a FIFO) is a stall, logged with the shard each reader is reading.

A loader failure (``data.on_error=raise``) or a stall must not leave the other ranks waiting in a collective: the
failing rank records it, raises the DATA_ERROR (or DATA_STALL) flag and repeats its last batch until the next
agreement check, where every rank stops together with the message.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import Accelerator

from vegan_scale.data.decode import SKIP_REASONS
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import Batch, Readers, TrainStream
from vegan_scale.distributed.accelerator import BatchLayout
from vegan_scale.distributed.agreement import Agreement, Flag
from vegan_scale.errors import DataError, DataStallError
from vegan_scale.experiment import image_shape, read_retry
from vegan_scale.stops import ends_wait

log = logging.getLogger("vegan_scale")

WORKER_CHECK_S = 1.0  # how often the training thread, waiting for a batch, looks whether a loader worker ended


def open_stream(cfg: Any, accelerator: Accelerator, layout: BatchLayout) -> TrainStream:
    """This process's stream of training micro-batches, as the ``data`` section describes it."""
    d, shape = cfg.data, image_shape(cfg)
    index = read_index(d.train, d.train_weights, skip_missing=d.on_error == "skip", image_shape=shape, key="data.train")
    return TrainStream(
        index,
        shape,
        layout.micro,
        cfg.run.seed,
        accelerator.process_index,
        accelerator.num_processes,
        d.num_workers,
        d.shuffle_buffer,
        d.mode,
        d.epoch_samples,
        d.on_error,
        read_retry(cfg),
        Readers.create(max(1, d.num_workers)),
        layout.accumulation,
    )


class DataFeed:
    def __init__(
        self,
        stream: TrainStream,
        agreement: Agreement,
        device: torch.device,
        announce: bool,
        start: int = 0,
        memory_format: torch.memory_format = torch.contiguous_format,
        stall_timeout_s: float = 300.0,
        symmetric: bool = False,
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        """``start``: micro-batches already consumed (by the run this one continues); ``symmetric``: batches in
        [-1, 1] rather than [0, 1] (data.input_range); ``stopping``: whether this process was asked to stop."""
        self.stream, self.agreement, self.device, self.announce = stream, agreement, device, announce
        self.stopping = stopping
        self.memory_format, self.stall_timeout_s, self.symmetric = memory_format, stall_timeout_s, symmetric
        self.epoch, offset = divmod(start, stream.batches_per_epoch)
        self.error: str | None = None
        self.data_time, self.skipped = 0.0, torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
        self._last: torch.Tensor | None = None
        self._queue: queue.Queue[tuple[int, Batch | BaseException]] = queue.Queue(maxsize=1)
        self._closing = threading.Event()
        self._fetcher = threading.Thread(target=self._fetch, args=(self.epoch, offset), name="data-feed", daemon=True)
        self._fetcher.start()

    def _epochs(self, first: int, offset: int) -> Iterator[tuple[int, Batch]]:
        previous = None
        for epoch, batch in self.stream.epochs(first, start=offset):
            if epoch != previous and self.announce:
                order = self.stream.order(epoch)
                if order.dropped:
                    log.info(
                        "epoch %d: the last %d samples, less than a global batch, are left out (%d global batches)",
                        epoch,
                        order.dropped,
                        order.steps,
                    )
            previous = epoch
            yield epoch, batch

    def _fetch(self, epoch: int, offset: int) -> None:
        """The background thread: batches (with their epoch) into the queue, or the error that ended them."""
        try:
            for item in self._epochs(epoch, offset):
                self._queue.put(item)
                if self._closing.is_set():
                    return
        except BaseException as e:  # handed to the training thread, which decides
            self._queue.put((-1, e))

    def next(self) -> torch.Tensor:
        """The next micro-batch as floats in the model's range on the device."""
        start = time.perf_counter()
        if self.error is None:
            self._take()
        if self._last is None:  # failed before the first batch: any batch of the right shape keeps step
            self._last = torch.zeros((self.stream.batch_size, *self.stream.image_shape), device=self.device)
        self.data_time += time.perf_counter() - start
        return self._last

    def _take(self) -> None:
        try:
            epoch, item = self._wait()
        except _NoBatch as e:
            self._fail(Flag.DATA_STALL, self._stall_message(e.waited_s))
            return
        if isinstance(item, DataError):
            self._fail(Flag.DATA_ERROR, worker_message(item))
            return
        if isinstance(item, DataStallError):  # a loader worker ended
            log.error("%s", item)
            self._fail(Flag.DATA_STALL, str(item))
            return
        if isinstance(item, BaseException):
            raise item
        images, _, skipped = item
        self.epoch = epoch
        self.skipped += skipped
        images = images.to(self.device, non_blocking=True).float()
        images = images.mul_(2 / 255).sub_(1) if self.symmetric else images.div_(255)
        self._last = images.contiguous(memory_format=self.memory_format)

    def _wait(self) -> tuple[int, Batch | BaseException]:
        """The fetcher's next item; _NoBatch after the stall timeout, or sooner when a stop ends the wait
        (:func:`vegan_scale.stops.ends_wait`). While
        none comes, a loader worker that ended is the item: the fetcher may never say so, waiting for the rest of a
        block the worker was writing."""
        started = time.monotonic()
        deadline = started + self.stall_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            with contextlib.suppress(queue.Empty):
                return self._queue.get(timeout=min(left, WORKER_CHECK_S))
            if self.stream.readers is not None and (ended := self.stream.readers.ended()) is not None:
                return -1, ended
            if ends_wait(time.monotonic() - started, self.stopping):
                raise _NoBatch(time.monotonic() - started)
        raise _NoBatch(self.stall_timeout_s)

    def _stall_message(self, waited_s: float) -> str:
        readers = self.stream.readers.shards(self.stream.index.urls) if self.stream.readers else []
        message = (
            f"no batch for {waited_s:.0f} s (data.stall_timeout_s={self.stall_timeout_s:g}): a read does not return; "
            + "; ".join(readers)
        )
        log.error("%s", message)
        return message

    def _fail(self, flag: Flag, message: str) -> None:
        self.error = message
        self.agreement.raise_if(flag, torch.ones((), dtype=torch.bool, device=self.device), 0)

    def close(self, wait_s: float = 10.0) -> None:
        """Stop taking batches and release the loader's workers; wait (boundedly) for the loader to shut down.
        Where the data failed, the fetcher is left behind in its daemon thread at once: stuck in a read that never
        returns, or waiting for the rest of a block from a worker that ended (or done, after a bad sample)."""
        self._closing.set()
        readers = self.stream.readers
        if readers is not None:
            readers.released.set()
        failed = self.error is not None or (readers is not None and readers.ended() is not None)
        deadline = time.monotonic() + (0.0 if failed else wait_s)
        while self._fetcher.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()  # a fetcher waiting to hand over a batch then sees that it is closing
            self._fetcher.join(timeout=0.05)

    def take_counts(self, world_size: int) -> tuple[float, dict[str, float]]:
        """Collective: (seconds spent waiting for data here, samples skipped by reason over all ranks) since the
        last call."""
        skipped = self.skipped.to(self.device)
        if world_size > 1:
            torch.distributed.all_reduce(skipped)
        data_time, self.data_time, self.skipped = self.data_time, 0.0, torch.zeros_like(self.skipped)
        counts = {f"data/skipped/{r}": float(n) for r, n in zip(SKIP_REASONS, skipped.tolist(), strict=True) if n}
        return data_time, counts


class _NoBatch(Exception):
    """No batch came for ``waited_s`` seconds."""

    def __init__(self, waited_s: float) -> None:
        super().__init__(f"no batch for {waited_s:.0f} s")
        self.waited_s = waited_s


def worker_message(error: DataError) -> str:
    """The DataError's own message, without the traceback a DataLoader worker wraps around it."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text
