"""A read that never returns (a stuck network file system, here a FIFO nobody writes): no batch for
data.stall_timeout_s is logged with the shard being read, and every rank stops with a named error (exit 69) in
bounded time, loader workers or not, one process or two."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tests.runkit import ddp, exit_status, run, single, train_args
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards

pytestmark = pytest.mark.distributed

STALL = ["data.stall_timeout_s=3", "train.collective_timeout_s=60"]


def shards_with_a_fifo(root: Path, world: int, rank: int) -> Path:
    """Five 100-sample shards of which the one ``rank`` of ``world`` (no loader workers, global batch 20, seed 0)
    reads first in epoch 0 is a FIFO: opening it blocks until a writer comes, and none ever does."""
    images = np.random.default_rng(0).integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    write_shards(ArraySource(images, np.arange(500) % 10), root, prefix="s", samples_per_shard=100)
    stream = TrainStream(read_index(str(root)), (1, 28, 28), 20 // world, 0, rank, world)
    first = Path(stream.plan(0).readers[0].ranges[0][0])
    first.unlink()
    os.mkfifo(first)
    (root / "stalls.json").write_text(json.dumps(first.name))
    return first


@pytest.mark.parametrize("workers", [0, 1])
def test_a_read_that_never_returns_stops_the_run_naming_the_shard(
    workers: int, tiny_shards: Path, tmp_path: Path
) -> None:
    fifo = shards_with_a_fifo(tmp_path / "stuck", 1, 0)
    args = train_args(tiny_shards, tmp_path, "stall", "wae_mmd", f"data.train={fifo.parent}", *STALL)
    start = time.monotonic()
    proc = run(single([*args, f"data.num_workers={workers}"]), timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 69, proc.stderr[-3000:]
    assert fifo.name in proc.stderr and "data.stall_timeout_s" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and elapsed < 60
    status = exit_status(tmp_path / "mnist" / "stall")
    assert status["code"] == 69 and fifo.name in status["reason"]


def test_one_stalled_rank_stops_every_rank(tiny_shards: Path, tmp_path: Path) -> None:
    """Two processes, rank 1's first shard a FIFO: rank 0 waits for rank 1 in a collective, rank 1 gives up on the
    read after the stall timeout, and both stop at the next check with the stall named (exit status 69)."""
    fifo = shards_with_a_fifo(tmp_path / "stuck", 2, 1)
    args = train_args(tiny_shards, tmp_path, "stall", "wae_mmd", f"data.train={fifo.parent}", *STALL)
    start = time.monotonic()
    proc = run(ddp(args), timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - start < 90, output[-3000:]
    status = exit_status(tmp_path / "mnist" / "stall")
    assert status["code"] == 69 and "process 1" in status["reason"] and fifo.name in status["reason"], status
