"""The training batches of this process, on the device, epoch after epoch, with loader failures made collective.

A loader failure (``data.on_error=raise``) must not leave the other ranks waiting in a collective: the failing
rank records the error, raises the DATA_ERROR flag and repeats its last batch until the next agreement check,
where every rank stops together with the error's message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator

from vegan_scale.data.decode import SKIP_REASONS
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import Batch, TrainStream
from vegan_scale.distributed.accelerator import BatchLayout
from vegan_scale.distributed.agreement import Agreement, Flag
from vegan_scale.errors import DataError
from vegan_scale.registry import image_shape
from vegan_scale.retry import Backoff

log = logging.getLogger("vegan_scale")


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
        Backoff(attempts=d.read_attempts),
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
    ) -> None:
        """``start``: micro-batches already consumed (by the run this one continues)."""
        self.stream, self.agreement, self.device, self.announce = stream, agreement, device, announce
        self.memory_format = memory_format
        self.epoch, self._offset = divmod(start, stream.batches_per_epoch)
        self.error: str | None = None
        self.data_time, self.skipped = 0.0, torch.zeros(len(SKIP_REASONS), dtype=torch.int64)
        self._batches = self._epochs()
        self._last: torch.Tensor | None = None

    def _epochs(self) -> Iterator[Batch]:
        while True:
            plan = self.stream.plan(self.epoch)
            if plan.dropped and self.announce:
                log.info(
                    "epoch %d: %d samples left unread so that every process gets %d full batches",
                    self.epoch,
                    plan.dropped,
                    plan.batches,
                )
            yield from self.stream.epoch(self.epoch, start=self._offset)
            self.epoch, self._offset = self.epoch + 1, 0

    def next(self) -> torch.Tensor:
        """The next micro-batch as floats in [0, 1] on the device."""
        start = time.perf_counter()
        if self.error is None:
            try:
                images, _, skipped = next(self._batches)
                self.skipped += skipped
                images = images.to(self.device, non_blocking=True).float().div_(255)
                self._last = images.contiguous(memory_format=self.memory_format)
            except DataError as e:
                self.error = worker_message(e)
                self.agreement.raise_if(Flag.DATA_ERROR, torch.ones((), dtype=torch.bool, device=self.device), 0)
        if self._last is None:  # failed before the first batch: any batch of the right shape keeps step
            self._last = torch.zeros((self.stream.batch_size, *self.stream.image_shape), device=self.device)
        self.data_time += time.perf_counter() - start
        return self._last

    def take_counts(self, world_size: int) -> tuple[float, dict[str, float]]:
        """Collective: (seconds spent waiting for data here, samples skipped by reason over all ranks) since the
        last call."""
        skipped = self.skipped.to(self.device)
        if world_size > 1:
            torch.distributed.all_reduce(skipped)
        data_time, self.data_time, self.skipped = self.data_time, 0.0, torch.zeros_like(self.skipped)
        counts = {f"data/skipped/{r}": float(n) for r, n in zip(SKIP_REASONS, skipped.tolist(), strict=True) if n}
        return data_time, counts


def worker_message(error: DataError) -> str:
    """The DataError's own message, without the traceback a DataLoader worker wraps around it."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text
