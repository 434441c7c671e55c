"""The data stops coming. A read that never returns (a stuck network file system, here a FIFO nobody writes): no
batch for data.stall_timeout_s is logged with the shard being read, and every rank stops with a named error (exit
69) in bounded time, loader workers or not, one process or two. A loader worker killed (as the kernel's
out-of-memory killer does): the same, naming the worker and the signal."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.runkit import (
    ddp,
    exit_status,
    finish,
    processes,
    run,
    single,
    start,
    train_args,
    wait_for_step,
    wait_until,
)
from tests.shardkit import read_only_by
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import Readers, TrainStream
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards
from vegan_scale.distributed.agreement import Agreement, Flag
from vegan_scale.engine.feed import DataFeed

pytestmark = pytest.mark.distributed

STALL = ["data.stall_timeout_s=3", "train.collective_timeout_s=60"]


def shards_with_a_fifo(root: Path, world: int, rank: int) -> Path:
    """Five 100-sample shards of which one that only rank ``rank`` of ``world`` reads in epoch 0 (global batch 20,
    seed 0) is a FIFO: opening it blocks until a writer comes, and none ever does."""
    images = np.random.default_rng(0).integers(0, 256, size=(500, 28, 28), dtype=np.uint8)
    write_shards(ArraySource(images, np.arange(500) % 10), root, prefix="s", samples_per_shard=100)
    first = Path(read_only_by(read_index(str(root)), 20, world, rank)[0])
    first.unlink()
    os.mkfifo(first)
    (root / "stalls.json").write_text(json.dumps(first.name))
    return first


@pytest.mark.parametrize(
    ("workers", "pretrain"), [(0, 0), (1, 0), (0, 5)], ids=["stream", "stream-worker", "encoder-pretraining"]
)
def test_a_read_that_never_returns_stops_the_run_naming_the_shard(
    workers: int, pretrain: int, tiny_shards: Path, tmp_path: Path
) -> None:
    """A FIFO among the shards: the training stream (read in the training process or a loader worker), or the
    image pool encoder pre-training reads before the first step, stops with exit 69 and the shard named."""
    fifo = shards_with_a_fifo(tmp_path / "stuck", 1, 0)
    args = train_args(tiny_shards, tmp_path, "stall", "wae_mmd", f"data.train={fifo.parent}", *STALL)
    start = time.monotonic()
    options = [f"data.num_workers={workers}", f"train.encoder_pretrain_steps={pretrain}"]
    proc = run(single([*args, *options]), timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 69, proc.stderr[-3000:]
    assert fifo.name in proc.stderr and "data.stall_timeout_s" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and elapsed < 60
    if pretrain:  # a new run that fails while it is being built leaves no run directory
        assert not (tmp_path / "mnist" / "stall").exists()
        return
    status = exit_status(tmp_path / "mnist" / "stall")
    assert status["code"] == 69 and fifo.name in status["reason"]
    saved = list((tmp_path / "mnist" / "stall" / "checkpoints").glob("step_*"))
    assert ("no checkpoint was written yet" in status["reason"]) == (not saved), (status, saved)


@pytest.mark.parametrize("pretrain", [0, 5], ids=["training stream", "images read at start"])
def test_a_stop_request_while_the_data_does_not_come_stops_the_run_at_once(
    pretrain: int, tiny_shards: Path, tmp_path: Path
) -> None:
    """SIGTERM to the job (a preemption) while a read never returns: the stop was held until data.stall_timeout_s
    ran out (300 s by default, far past SLURM's KillWait), then the run ended as a stall (69), not as stopped. A
    stop asked for while no batch has come for 10 s ends the wait: the run stops at once (75, to be continued),
    naming the shard; in the training stream without a checkpoint (the steps since the last one trained on no new
    data), in the encoder's pre-training pool before the run has begun."""
    fifo = shards_with_a_fifo(tmp_path / "stuck", 1, 0)
    args = train_args(tiny_shards, tmp_path, "stall", "wae_mmd", f"data.train={fifo.parent}", "data.num_workers=0")
    args += [f"train.encoder_pretrain_steps={pretrain}", "data.stall_timeout_s=240", "train.collective_timeout_s=600"]
    proc = start(single(args))
    started = tmp_path / "mnist" / "stall" / "train.log"
    if not pretrain:  # the run directory is written once the run is built, just before the first batch
        wait_until("the run to start", started.exists, proc)
    time.sleep(6 if pretrain else 2)  # into the wait for the data (the pool is read while the run is built)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGTERM)
    code, output = finish(proc, timeout=120)
    assert code == 75, output[-3000:]
    assert time.monotonic() - signalled < 60 and fifo.name in output, output[-3000:]
    if pretrain:  # a new run stopped while it was built leaves no run directory
        assert "while the images read at start did not come" in output and not started.exists(), output[-3000:]
        return
    status = exit_status(tmp_path / "mnist" / "stall")
    assert status["code"] == 75 and "while the data did not come" in status["reason"] and fifo.name in status["reason"]


def test_evaluation_images_that_never_come_are_an_error_in_bounded_time(tmp_path: Path) -> None:
    """`vegan-scale eval` and `sample` read their test images with no stall timeout: a shard that never answers (a
    FIFO here, a stuck file system or a server that stalls) held the command for ever. They now use the run's
    data.stall_timeout_s, as training does."""
    from vegan_scale.errors import DataStallError
    from vegan_scale.evaluation.model_source import ModelSource
    from vegan_scale.experiment import load_experiment

    shards_with_a_fifo(tmp_path / "test", 1, 0)
    source = ModelSource(None, load_experiment(None, ["data.stall_timeout_s=1"]), None, None, tmp_path / "weights")
    started = time.monotonic()
    with pytest.raises(DataStallError, match=r"no sample for 1 s .* from .*\.tar"):
        source.test_images(500, str(tmp_path / "test"))
    assert time.monotonic() - started < 30  # the reading thread is left behind, blocked in the FIFO's open


def test_one_stalled_rank_stops_every_rank(tiny_shards: Path, tmp_path: Path) -> None:
    """Two processes, rank 1's first shard a FIFO: rank 0 waits for rank 1 in a collective, rank 1 gives up on the
    read after the stall timeout, and both stop at the next check with the stall named (exit status 69)."""
    fifo = shards_with_a_fifo(tmp_path / "stuck", 2, 1)
    args = train_args(tiny_shards, tmp_path, "stall", "wae_mmd", f"data.train={fifo.parent}", *STALL)
    start = time.monotonic()
    proc = run(ddp([*args, "train.encoder_pretrain_steps=0"]), timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.monotonic() - start < 90, output[-3000:]
    status = exit_status(tmp_path / "mnist" / "stall")
    assert status["code"] == 69 and "process 1" in status["reason"] and fifo.name in status["reason"], status


def loader_worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of the loader worker of training process ``rank`` among ``launcher``'s descendants (from /proc)."""
    parents = {pid: int(fields[1]) for pid, fields in processes().items()}
    family, grew = {launcher}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in family} - family
        family, grew = family | more, bool(more)
    for pid in family:
        try:
            is_worker = Path(f"/proc/{pid}/comm").read_text().strip() == "pt_data_worker"
            environ = Path(f"/proc/{parents[pid]}/environ").read_bytes().split(b"\0")
        except (OSError, KeyError):
            continue
        if is_worker and f"RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no loader worker of rank {rank} under process {launcher}")


def test_a_killed_loader_worker_stops_every_rank(tiny_shards: Path, tmp_path: Path) -> None:
    """Two processes with a loader worker each; rank 1's worker killed by SIGKILL mid-run: both ranks stop at the
    next check, well within the collective timeout, with exit status 69 naming process 1, the worker and the
    signal, every checkpoint complete (the DataLoader alone says only that a worker exited unexpectedly,
    on one rank, while the other waits for it in a collective)."""
    run_dir = tmp_path / "mnist" / "killed"
    args = train_args(tiny_shards, tmp_path, "killed", "wae_mmd", "train.max_steps=100000", "data.num_workers=1")
    proc = start(ddp([*args, "train.encoder_pretrain_steps=0", "train.collective_timeout_s=120"]))
    wait_for_step(proc, run_dir, 6)
    worker = loader_worker_of_rank(proc.pid, 1)
    os.kill(worker, signal.SIGKILL)
    killed = time.monotonic()
    code, out = finish(proc, timeout=120)
    assert code != 0 and time.monotonic() - killed < 60, out[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == 69, (status, out[-3000:])
    assert "process 1" in status["reason"] and f"pid {worker}" in status["reason"] and "SIGKILL" in status["reason"]
    saved = list((run_dir / "checkpoints").glob("step_*"))
    assert saved and all((c / "COMPLETE").exists() for c in saved)  # none half-written
    assert f"the last complete checkpoint, {max(saved)}, is intact" in status["reason"], status


def test_a_worker_killed_while_handing_over_a_block_is_seen_by_the_training_thread(tiny_shards: Path) -> None:
    """A loader worker killed while it writes a block larger than the loader's pipe holds (the write waits for the
    reader) leaves the thread that reads the loader waiting for the rest of the block. The training thread, waiting
    for its batch, sees the worker's end within seconds, long before the stall timeout: it names the pid and the
    signal and raises DATA_STALL. So it does where a loader has run with workers in this process's main thread
    before (as in a notebook), leaving torch's SIGCHLD handler, which raises in the main thread when a worker it
    knows ends."""
    assert list(DataLoader(range(2), num_workers=1)) == [0, 1]  # torch's SIGCHLD handler is set from here on
    stream = TrainStream(
        read_index(str(tiny_shards / "train")), (1, 28, 28), 50, 0, num_workers=1, shuffle_buffer=500,
        readers=Readers.create(1),
    )  # fmt: skip
    agreement = Agreement(torch.device("cpu"), 1)
    feed = DataFeed(stream, agreement, torch.device("cpu"), announce=False, stall_timeout_s=60)
    feed.next()  # the first block (epoch 0, 500 images) has come; the worker is writing the next, 392 kB
    time.sleep(1)
    worker = stream.readers.workers[0]
    os.kill(worker.pid, signal.SIGKILL)
    killed = time.monotonic()
    while feed.error is None and time.monotonic() - killed < 20:
        feed.next()
    feed.close()
    assert time.monotonic() - killed < 5, feed.error
    assert f"pid {worker.pid}" in feed.error and "SIGKILL" in feed.error, feed.error
    assert Flag.DATA_STALL in agreement.check()
