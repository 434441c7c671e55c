"""The first images of a set of shards, decoded in the calling process: the evaluation set and the encoder's
pre-training pool, read once at start (the training stream is :mod:`vegan_scale.data.pipeline`'s)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from vegan_scale.data.decode import SampleError, decode_sample
from vegan_scale.data.faults import ShardError
from vegan_scale.data.index import ShardIndex
from vegan_scale.data.shardio import read_samples
from vegan_scale.errors import DataError, DataStallError, PreemptedError
from vegan_scale.retry import Backoff
from vegan_scale.stops import ends_wait

log = logging.getLogger("vegan_scale.data")

WAKE_S = 1.0  # how often the waiting thread looks at the reader's progress and for a stop


def load_images(
    index: ShardIndex,
    shape: tuple[int, int, int],
    limit: int,
    retry: Backoff | None = None,
    stall_timeout_s: float | None = None,
    on_error: str = "raise",
    stopping: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``limit`` samples of the shards in order, decoded in this process (for evaluation and encoder
    pre-training). With ``stall_timeout_s``, no sample for that long (a read that never returns) is a
    DataStallError naming the shard; the reading thread is left behind, blocked where the kernel holds it. A stop
    asked for (``stopping``) ends the wait sooner (:func:`vegan_scale.stops.ends_wait`), as a stop: the run is
    starting, so nothing is lost. With ``on_error=skip`` a bad sample, or the rest of a bad shard, is passed over
    and counted in a warning."""
    retry = retry or Backoff()
    progress: dict[str, Any] = {"url": index.urls[0], "items": [], "error": None}
    skipped: dict[str, int] = {}

    def passed_over(error: ShardError | SampleError) -> None:
        if on_error == "raise":
            raise error
        skipped[error.reason] = skipped.get(error.reason, 0) + 1

    def read() -> None:
        try:
            for url in index.urls:
                progress["url"] = url
                try:
                    for sample in read_samples(url, retry):
                        try:
                            progress["items"].append(decode_sample(sample, shape))
                        except SampleError as e:
                            passed_over(e)
                        if len(progress["items"]) == limit:
                            return
                except ShardError as e:
                    passed_over(e)
        except BaseException as e:  # handed to the caller's thread
            progress["error"] = e

    reader = threading.Thread(target=read, name="load-images", daemon=True)
    reader.start()
    seen, since = -1, time.monotonic()
    while reader.is_alive():
        reader.join(WAKE_S)
        now = time.monotonic()
        if not reader.is_alive() or len(progress["items"]) != seen:
            seen, since = len(progress["items"]), now
        elif stall_timeout_s is not None and now - since >= stall_timeout_s:
            raise DataStallError(
                f"no sample for {stall_timeout_s:g} s (data.stall_timeout_s) from {progress['url']}: a read does "
                "not return (a stuck file system, a FIFO?)"
            )
        elif ends_wait(now - since, stopping):
            raise PreemptedError(
                f"stopped on a stop request while the images read at start did not come (no sample for "
                f"{now - since:.0f} s from {progress['url']}); the run had not begun, so nothing is lost"
            )
    if progress["error"] is not None:
        raise progress["error"]
    items = progress["items"]
    if skipped:
        log.warning("bad data passed over while reading %d images (data.on_error=skip): %s", len(items), skipped)
    if not items:
        raise DataError(f"no samples in {index.urls[0]} ...")
    return torch.stack([i[0] for i in items]), torch.tensor([i[1] for i in items], dtype=torch.int64)
