"""The training stream, on hand-built tar shards whose images carry their sample id: the order's contract (a
function of seed, epoch and step: the same global batches at every world size, worker count and accumulation),
coverage, the reads each rank makes, resumption by step, and bad data in both error modes. Several ranks are
simulated in one process."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import synthetic_images

from tests.paths import ROOT
from tests.shardkit import (
    RunsShell,
    batch_ids,
    epoch_error,
    id_images,
    ids_of,
    make_shards,
    npy_bytes,
    sample_members,
    serve,
    truncate,
)
from vegan_scale.data.decode import SKIP_REASONS
from vegan_scale.data.images import load_images
from vegan_scale.data.index import ShardIndex, read_index
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.errors import DataError

SHAPE = (1, 8, 8)
GREY28 = (1, 28, 28)


def stream(index: ShardIndex, batch: int, **kwargs) -> TrainStream:
    kwargs = {"seed": 0, "shuffle_buffer": 20, **kwargs}
    return TrainStream(index, kwargs.pop("shape", SHAPE), batch, **kwargs)


def check_pixels(batches: list, side: int = 8) -> None:
    """Every image is the id_images image of the id it carries, and every label is that id % 10."""
    for images, labels, _ in batches:
        ids = ids_of(images)
        np.testing.assert_array_equal(images[:, 0].numpy(), id_images(ids, side))
        assert labels.tolist() == [i % 10 for i in ids]


def skip_counts(batches: list) -> dict[str, int]:
    total = sum((skips for _, _, skips in batches), torch.zeros(len(SKIP_REASONS), dtype=torch.int64))
    return {reason: n for reason, n in zip(SKIP_REASONS, total.tolist(), strict=True) if n}


# --- one rank ---


@pytest.mark.data
def test_real_mnist_shards_match_source(mnist_shards, mnist_wheel):
    """The MNIST shards hold the hash-checked wheel's images and labels in order (first samples of each split)."""
    from vegan_scale.data.sources import load_mnist

    train, test = load_mnist(mnist_wheel)
    for split, data, total in (("train", train, 60000), ("test", test, 10000)):
        index = read_index(str(mnist_shards / split))
        assert index.num_samples == total and index.image_shape == GREY28
        images, labels = load_images(index, GREY28, limit=300)
        np.testing.assert_array_equal(images[:, 0].numpy(), data.images[:300])
        np.testing.assert_array_equal(labels.numpy(), data.labels[:300])


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_epoch_reads_every_sample_once(tiny_shards, num_workers):
    """One epoch on one process yields all 500 samples exactly once, with their own pixels and labels."""
    index = read_index(str(tiny_shards / "train"))
    s = stream(index, 50, shape=GREY28, num_workers=num_workers, shuffle_buffer=100)
    batches = list(s.epoch(0))
    assert len(batches) == s.order(0).steps == 10 and s.order(0).dropped == 0
    assert sorted(batch_ids(batches)) == list(range(500))
    reference = synthetic_images(500, seed=len("train"))
    for images, labels, skips in batches:
        assert images.dtype == torch.uint8 and images.shape == (50, *GREY28)
        ids = ids_of(images)
        np.testing.assert_array_equal(images[:, 0].numpy(), reference[ids])
        assert labels.tolist() == [i % 10 for i in ids]
        assert skips.tolist() == [0] * len(SKIP_REASONS)


def test_a_script_that_leaves_a_stream_unfinished_exits(tiny_shards):
    """A process that takes one batch of a 1-worker stream and ends with the iterator still referenced exits at
    once: its worker, which ignores a job's stop signals while training needs it, is released at exit (it used to
    wait for the worker forever)."""
    script = (
        "from vegan_scale.data.index import read_index\n"
        "from vegan_scale.data.pipeline import TrainStream\n"
        f"stream = TrainStream(read_index({str(tiny_shards / 'train')!r}), (1, 28, 28), 50, 0, num_workers=1)\n"
        "batches = stream.epoch(0)\n"
        "next(batches)\n"
        "print('took a batch', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "took a batch" in done.stdout, done.stderr[-2000:]


def test_epoch_is_shuffled_across_shards(tiny_shards):
    """The shuffle buffer mixes samples: the order is neither the stored order nor shard by shard."""
    index = read_index(str(tiny_shards / "train"))
    ids = batch_ids(list(stream(index, 50, shape=GREY28, shuffle_buffer=200).epoch(0)))
    assert ids != sorted(ids)
    assert len({i // 100 for i in ids[:50]}) > 1


def test_impossible_layouts(tiny_shards):
    """More loader workers than samples per process and step, or an epoch without one global batch: a DataError
    with the numbers and what to change."""
    index = read_index(str(tiny_shards / "train"))
    with pytest.raises(DataError, match="3 loader workers for 2 samples per process and step"):
        stream(index, 2, shape=GREY28, world_size=3, num_workers=3)
    for mode in ("epoch", "resampled"):
        with pytest.raises(DataError, match="holds no global batch of 600"):
            stream(index, 300, shape=GREY28, rank=0, world_size=2, mode=mode)


# --- the order's contract ---

SIZES = [37, 50, 23, 61, 29]  # 200 samples; a global batch of 12 leaves 8 out


def sequence(order, sizes: list[int]) -> list[int]:
    """The ids of the epoch's sample sequence S: the order's shards, in its order, each read whole."""
    firsts = {f"s-{i:06d}.tar": sum(sizes[:i]) for i in range(len(sizes))}
    pairs = zip(order.urls, order.counts, strict=True)
    return [firsts[Path(url).name] + k for url, count in pairs for k in range(count)]


def global_batches(index: ShardIndex, world: int, workers: int, accumulation: int, start: int = 0, **kw) -> list:
    """The global batches of steps ``start``, ... as lists of ids: each rank's micro-batches of a step, rank after
    rank, put together; and the skip counts of every rank added."""
    per_rank, skips = [], 0
    for rank in range(world):
        s = stream(index, 12 // world // accumulation, rank=rank, world_size=world, num_workers=workers,
                   accumulation=accumulation, seed=5, shuffle_buffer=40, **kw)  # fmt: skip
        batches = list(s.epoch(0, start=start * accumulation))
        check_pixels(batches)
        per_rank.append([ids_of(images) for images, _, _ in batches])
        skips = skips + sum(k for _, _, k in batches)
    steps = len(per_rank[0]) // accumulation
    steps_ids = [[i for r in range(world) for m in range(accumulation) for i in per_rank[r][t * accumulation + m]]
                 for t in range(steps)]  # fmt: skip
    return steps_ids, skips


TOPOLOGIES = [(2, 0, 1), (2, 2, 1), (4, 1, 1), (2, 1, 2), (3, 2, 2), (6, 0, 1)]  # (world, workers, accumulation)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("offsets", [False, True], ids=["scan", "idx"])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_global_batches_are_the_same_at_every_topology(tmp_path, mode, offsets):
    """The global batch of every step, and of every step after a restart at step 5, is the same for 1 to 6
    processes, 0 to 2 loader workers each and 1 or 2 micro-batches per step; with and without shard indexes."""
    make_shards(tmp_path, SIZES, offsets=offsets)
    index = read_index(str(tmp_path))
    reference, _ = global_batches(index, 1, 0, 1, mode=mode)
    assert len(reference) == 16 and all(len(batch) == 12 for batch in reference)
    for world, workers, accumulation in TOPOLOGIES:
        assert global_batches(index, world, workers, accumulation, mode=mode)[0] == reference
        assert global_batches(index, world, workers, accumulation, start=5, mode=mode)[0] == reference[5:]


def test_batches_are_lanes_of_the_sequence(tmp_path):
    """Blocks of L = ceil(shuffle_buffer / B) batches cover L B consecutive samples of S, and each batch takes one
    sample from each of the block's B lanes (L consecutive samples); without a buffer a batch is B consecutive
    samples. The epoch covers S but its last len(S) mod B samples (dropped)."""
    make_shards(tmp_path, SIZES)
    index = read_index(str(tmp_path))
    for shuffle, lane in ((40, 4), (1, 1), (24, 2)):
        s = stream(index, 12, seed=5, shuffle_buffer=shuffle)
        order = s.order(0)
        assert order.batches_per_block == lane and order.dropped == 200 % 12 and order.steps == 200 // 12
        position = {i: p for p, i in enumerate(sequence(order, SIZES))}
        batches = [[position[i] for i in ids_of(images)] for images, _, _ in s.epoch(0)]
        for t, batch in enumerate(batches):
            block = t // lane * lane
            first, length = block * 12, min(lane, order.steps - block)
            assert [(p - first) // length for p in batch] == list(range(12)), (shuffle, t)
        covered = sorted(p for batch in batches for p in batch)
        assert covered == list(range(200 - order.dropped))


def test_each_sample_is_read_once_by_the_reader_that_trains_on_it(tmp_path, monkeypatch):
    """2 processes x 2 workers: the stretches the four readers read are disjoint, cover the epoch's
    batches exactly, and each reader reads one contiguous stretch of S per block (its lanes)."""
    import vegan_scale.data.pipeline as pipeline
    import vegan_scale.data.sequence as sequence

    make_shards(tmp_path, SIZES, offsets=True)
    index = read_index(str(tmp_path))
    reads: list[tuple[int, int]] = []  # (start, length) of each stretch read
    original = sequence.SequenceReader.read

    def recording(self, start: int, length: int, skipped: dict) -> list:
        reads.append((start, length))
        return original(self, start, length, skipped)

    monkeypatch.setattr(sequence.SequenceReader, "read", recording)
    for rank in (0, 1):
        s = stream(index, 6, seed=5, rank=rank, world_size=2, shuffle_buffer=40)
        for worker in (0, 1):  # a worker's blocks, as its loader process makes them
            monkeypatch.setattr(pipeline, "get_worker_info", lambda w=worker: SimpleNamespace(id=w))
            blocks = pipeline._Blocks(dataclasses.replace(s, num_workers=2), 0, 0, endless=False)
            assert sum(block.labels.size for block in blocks) == 16 * 3
    positions = sorted(p for start, length in reads for p in range(start, start + length))
    assert positions == list(range(192))  # every trained sample once; the 8 left out never
    assert len(reads) == 4 * 4  # four readers, four blocks (4, 4, 4 and 4 batches): one stretch each


def test_remote_shards_send_each_trained_byte_once(tmp_path):
    """Shards over HTTP with their .idx, 2 processes: every request is a Range of exactly a stretch of samples;
    the stretches of a shard do not overlap, and together they are the bytes of the samples trained on (the 8
    left out are never sent)."""
    make_shards(tmp_path / "d", SIZES, offsets=True)
    with serve(tmp_path) as server:
        index = read_index(f"{server.url}/d/s-{{000000..000004}}.tar")
        ids = []
        for rank in (0, 1):
            ids += batch_ids(list(stream(index, 6, seed=5, rank=rank, world_size=2, shuffle_buffer=40).epoch(0)))
    offsets = {
        f"s-{i:06d}.tar": np.frombuffer((tmp_path / "d" / f"s-{i:06d}.tar.idx").read_bytes(), "<u8").tolist()
        for i in range(len(SIZES))
    }
    first_id = {name: sum(SIZES[:i]) for i, name in enumerate(sorted(offsets))}
    trained = sum(offsets[name][i - first_id[name] + 1] - offsets[name][i - first_id[name]]
                  for i in ids for name in [max(n for n in first_id if first_id[n] <= i)])  # fmt: skip
    assert len(ids) == 192 and all(end is not None for _, _, end in server.ranges)
    assert sum(end - start for _, start, end in server.ranges) == trained
    for name in offsets:
        spans = sorted((start, end) for n, start, end in server.ranges if n == name)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))


# --- several ranks, simulated in one process ---


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("sizes", [[100, 100, 100, 37, 3], [500, 10, 10, 7]], ids=["tail", "one_big"])
def test_uneven_shards_equal_batch_counts(tmp_path, mode, sizes):
    """Both ranks yield N // (batch * world) full batches, however unevenly the shards are sized."""
    make_shards(tmp_path, sizes)
    index = read_index(str(tmp_path))
    expected = sum(sizes) // 20
    for rank in (0, 1):
        s = stream(index, 10, rank=rank, world_size=2, num_workers=2, mode=mode)
        batches = list(s.epoch(0))
        assert len(batches) == s.order(0).steps == s.batches_per_epoch == expected
        assert all(images.shape == (10, *SHAPE) for images, _, _ in batches)
        check_pixels(batches)


def test_resampled_draws_follow_weights(tmp_path):
    """Two sources weighted 1 and 3: about three quarters of the samples come from the second (1000 shard
    draws: the share's standard deviation is 0.014, the tolerance 0.06)."""
    make_shards(tmp_path / "a", [4] * 10)
    make_shards(tmp_path / "b", [4] * 10, first_id=1000)
    index = read_index(f"{tmp_path / 'a'}::{tmp_path / 'b'}", [1.0, 3.0])
    s = stream(index, 50, mode="resampled", epoch_samples=4000, shuffle_buffer=1)
    batches = list(s.epoch(0))
    assert len(batches) == 80
    ids = batch_ids(batches)
    assert set(ids) <= set(range(40)) | set(range(1000, 1040))
    share = sum(i >= 1000 for i in ids) / len(ids)
    assert abs(share - 0.75) < 0.06, share


def test_resampled_source_left_without_shards(tmp_path):
    """A source whose shards are all gone (dropped by skip_missing) is not drawn from; the others still are."""
    make_shards(tmp_path / "a", [10, 10])
    make_shards(tmp_path / "b", [10, 10], first_id=100)
    for path in (tmp_path / "b").glob("*.tar"):
        path.unlink()
    index = read_index(f"{tmp_path / 'a'}::{tmp_path / 'b'}", skip_missing=True)
    assert [len(source.urls) for source in index.sources] == [2, 0]
    batches = list(stream(index, 5, mode="resampled", on_error="skip", epoch_samples=100).epoch(0))
    assert len(batches) == 20 and set(batch_ids(batches)) <= set(range(20))


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_order_depends_on_seed_and_epoch_only(tmp_path, mode, num_workers):
    """Same seed and epoch: identical batches (also with loader processes); another epoch or seed: another order."""
    make_shards(tmp_path, [30, 30, 30, 30])
    index = read_index(str(tmp_path))

    def run(seed: int, epoch: int) -> list:
        return list(stream(index, 10, seed=seed, num_workers=num_workers, mode=mode).epoch(epoch))

    first, again = run(0, 0), run(0, 0)
    assert len(first) == len(again) == 12
    for a, b in zip(first, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    reference = batch_ids(first)
    assert batch_ids(run(0, 1)) != reference
    assert batch_ids(run(1, 0)) != reference
    if mode == "epoch":
        assert sorted(batch_ids(run(0, 1))) == sorted(reference) == list(range(120))


# --- resuming at a step ---


def bad_npy(i: int) -> list:
    return [(f"{i:08d}.npy", b"\x93NUMPY\x01\x00not an array"), (f"{i:08d}.cls", b"1")]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")  # more than this machine's cores
@pytest.mark.parametrize("num_workers", [0, 1, 2, 3])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_matches_uninterrupted(tmp_path, mode, on_error, num_workers):
    """epoch(e, start=j) yields exactly batches j, j+1, ... of epoch(e): images, labels and skip counts. 7 batches
    per epoch (not a multiple of 2 or 3 workers); in skip mode the shards hold bad samples."""
    bad = {3: bad_npy(3), 31: [(f"{31:08d}.cls", b"1")], 47: bad_npy(47)} if on_error == "skip" else {}
    make_shards(tmp_path, [10, 10, 10, 10, 10, 6], replace=bad)
    index = read_index(str(tmp_path))
    s = stream(index, 8, seed=3, num_workers=num_workers, mode=mode, on_error=on_error, shuffle_buffer=15)
    assert s.batches_per_epoch == 7
    for epoch in (0, 1):
        full = list(s.epoch(epoch))
        assert len(full) == 7
        if mode == "epoch" and on_error == "skip":  # every sample is read: each bad one is counted once
            assert skip_counts(full) == {"no_image": 1, "undecodable_image": 2}
        for start in (1, 2, 5, 6) if epoch == 0 else (3,):
            resumed = list(s.epoch(epoch, start=start))
            assert len(resumed) == 7 - start
            for j, (a, b) in enumerate(zip(full[start:], resumed, strict=True)):
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (epoch, start, j)


@pytest.mark.parametrize(("num_workers", "by_value"), [(0, True), (2, True), (2, False)])
@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_epochs_run_on_from_one_loader(tmp_path, monkeypatch, mode, num_workers, by_value):
    """epochs(e, start=j), what training reads, is epoch(e) from batch j, then epoch(e + 1), epoch(e + 2) ..., each
    as read on its own (images, labels, skip counts), with its epoch; its loader workers start once for all of them
    (a loader per epoch forked the training process at every epoch). The blocks cross from the workers by value
    (small ones) or through shared memory (large ones; here every block): the same batches either way."""
    import multiprocessing

    import vegan_scale.data.pipeline as pipeline

    make_shards(tmp_path, [10, 10, 10, 10, 10, 6], replace={3: bad_npy(3), 47: bad_npy(47)})
    s = stream(read_index(str(tmp_path)), 8, seed=3, num_workers=num_workers, mode=mode, on_error="skip")
    separately = [(e, batch) for e in (1, 2, 3) for batch in s.epoch(e, start=5 if e == 1 else 0)]
    if not by_value:  # the forked workers inherit it
        monkeypatch.setattr(pipeline, "BY_VALUE_BYTES", -1)
    started, original = multiprocessing.Value("i", 0), pipeline._leave_stopping_to_the_trainer

    def counted(release, worker_id: int) -> None:  # in each loader worker, as it starts
        with started.get_lock():
            started.value += 1
        original(release, worker_id)

    monkeypatch.setattr(pipeline, "_leave_stopping_to_the_trainer", counted)
    together = list(itertools.islice(s.epochs(1, start=5), len(separately)))
    assert [e for e, _ in together] == [e for e, _ in separately] == [1, 1] + [2] * 7 + [3] * 7
    for (_, a), (_, b) in zip(together, separately, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    if mode == "epoch":  # two bad samples an epoch, counted in epochs 2 and 3 at least
        assert skip_counts([b for _, b in together])["undecodable_image"] >= 4
    assert started.value == num_workers


# --- bad data ---

GOOD = [20, 20, 20, 20]  # ids 0-79; a batch of 5, two ranks: 8 batches each, nothing dropped


def plant(case: str, root: Path, marker: Path) -> tuple[set[int], str, dict[str, int]]:
    """Write the shards with one defect; returns (ids that must not appear, words of the raise message, the
    skip counts of one read of every sample)."""
    bad25 = {
        "undecodable": (bad_npy(25), "cannot decode its npy image", "undecodable_image"),
        "no_image": ([("00000025.cls", b"5")], "no image member", "no_image"),
        "wrong_size": (
            [("00000025.npy", npy_bytes(id_images([25], side=9)[0, :8])), ("00000025.cls", b"5")],
            "data.image_size",
            "wrong_shape",
        ),
        "wrong_channels": (
            [("00000025.npy", npy_bytes(id_images([25], channels=3)[0])), ("00000025.cls", b"5")],
            "data.channels",
            "wrong_shape",
        ),
        "pickle": (
            [*sample_members(25, id_images([25])[0]), ("00000025.pyd", pickle.dumps(RunsShell(marker)))],
            "pickle",
            "unsafe_member",
        ),
    }
    if case in bad25:
        members, words, reason = bad25[case]
        make_shards(root, GOOD, replace={25: members})
        return {25}, words, {reason: 1}
    paths = make_shards(root, GOOD)
    if case == "truncated":  # cut inside the image of the shard's 9th sample (id 48): 8 samples of 2048 bytes
        truncate(Path(paths[2]), 8 * 2048 + 512 + 100)
        return set(range(48, 60)), "truncated", {"corrupt_shard": 12}
    if case == "unreadable":  # after indexing, a directory takes the shard's place
        return set(range(40, 60)), "cannot be read", {"unreadable_shard": 20}
    if case == "remote_403":  # after indexing, the server refuses the shard (a permission taken away)
        return set(range(40, 60)), "HTTP 403", {"refused_shard": 20}
    return set(range(40, 60)), "does not exist", {"missing_shard": 20}  # deleted or remote: after indexing


CASES = [
    "truncated",
    "undecodable",
    "no_image",
    "wrong_size",
    "wrong_channels",
    "pickle",
    "deleted",
    "unreadable",
    "remote_404",
    "remote_403",
]


@pytest.fixture()
def bad_data(tmp_path, request):
    """(index, ids that must not appear, message words, expected skip counts, marker) for request.param."""
    case, marker = request.param, tmp_path / "pwned"
    lost, words, counts = plant(case, tmp_path / "d", marker)
    if not case.startswith("remote"):
        index = read_index(str(tmp_path / "d"))
        if case in ("deleted", "unreadable"):
            (tmp_path / "d" / "s-000002.tar").unlink()
        if case == "unreadable":
            (tmp_path / "d" / "s-000002.tar").mkdir()
        yield index, lost, words, counts, marker
        return
    with serve(tmp_path) as server:
        index = read_index(f"{server.url}/d/s-{{000000..000003}}.tar")
        if case == "remote_404":
            (tmp_path / "d" / "s-000002.tar").unlink()
        else:
            server.faults["s-000002.tar"] = ["403"] * 100_000  # every request, resampled mode's many draws included
        yield index, lost, words, counts, marker


# resampled mode draws shards at random: 160 draws of 4 shards meet the bad one ((3/4)^160 ~ 1e-20 to miss)
RESAMPLED = {"mode": "resampled", "epoch_samples": 3200}


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("bad_data", CASES, indirect=True)
def test_bad_data_raises(bad_data, mode):
    """on_error=raise: reading the epoch is a DataError naming the shard and the problem; nothing is unpickled."""
    index, _, words, _, marker = bad_data
    extra = RESAMPLED if mode == "resampled" else {}
    message = epoch_error(stream(index, 5, **extra).epoch(0))
    assert words in message and "s-00000" in message, message
    assert not marker.exists()


@pytest.mark.parametrize("bad_data", ["pickle", "truncated"], indirect=True)
def test_bad_data_raises_through_loader_worker(bad_data):
    """The DataError survives the DataLoader worker boundary (the default data.num_workers is 1)."""
    index, _, words, _, marker = bad_data
    message = epoch_error(stream(index, 5, num_workers=1).epoch(0))
    assert words in message and "s-00000" in message
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
@pytest.mark.parametrize("bad_data", CASES, indirect=True)
def test_bad_data_skipped(bad_data, mode):
    """on_error=skip: every rank still yields full batches; no bad sample appears; each bad sample is counted
    once, under its reason (in resampled mode a shard drawn several times is counted at each draw); and the global
    batches and counts are the same with 1 and 2 processes."""
    index, lost, _, counts, marker = bad_data
    extra = RESAMPLED if mode == "resampled" else {}
    seen = []
    for world in (1, 2):
        batches, total = [], {}
        for rank in range(world):
            s = stream(index, 10 // world, rank=rank, world_size=world, on_error="skip", **extra)
            batches.append(list(s.epoch(0)))
            assert len(batches[-1]) == s.order(0).steps == (8 if mode == "epoch" else 320)
            check_pixels(batches[-1])
            assert not set(batch_ids(batches[-1])) & lost
            for reason, n in skip_counts(batches[-1]).items():
                total[reason] = total.get(reason, 0) + n
        seen.append(([ids for step in zip(*batches, strict=True) for b in step for ids in ids_of(b[0])], total))
    assert seen[0] == seen[1]
    if mode == "epoch":
        assert seen[0][1] == counts
    else:
        assert set(seen[0][1]) == set(counts)
    assert not marker.exists()


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_skip_gives_up_when_nothing_decodes(tmp_path, mode):
    """on_error=skip over shards that are all gone is a DataError, not an endless loop; it says why the samples were
    skipped (it pointed at warnings that were not there)."""
    make_shards(tmp_path, [10, 10])
    index = read_index(str(tmp_path))
    for path in tmp_path.glob("*.tar"):
        path.unlink()
    error = epoch_error(stream(index, 5, on_error="skip", mode=mode).epoch(0))
    assert re.search(r"too few samples of .* \(0 of \d+; skipped: missing_shard 20\)", error), error


def test_shard_shorter_than_sizes_json(tmp_path):
    """A shard holding fewer samples than sizes.json says is a DataError that says so."""
    make_shards(tmp_path, [10, 10])
    (tmp_path / "sizes.json").write_text('{"s-000000.tar": 10, "s-000001.tar": 15}')
    message = epoch_error(stream(read_index(str(tmp_path)), 5).epoch(0))
    assert "s-000001.tar holds 10 samples but sizes.json promises at least 15" in message


def test_short_shard_is_counted_when_skipping(tmp_path):
    """on_error=skip: the samples a shard lacks against sizes.json are counted as short_shard, the batches full."""
    make_shards(tmp_path, [10, 10])
    (tmp_path / "sizes.json").write_text('{"s-000000.tar": 10, "s-000001.tar": 15}')
    s = stream(read_index(str(tmp_path)), 5, on_error="skip")
    batches = list(s.epoch(0))
    assert len(batches) == s.order(0).steps == 5
    check_pixels(batches)
    assert skip_counts(batches) == {"short_shard": 5}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_shard_longer_than_sizes_json(tmp_path: Path, on_error: str, caplog: pytest.LogCaptureFixture) -> None:
    """A shard holding more samples than sizes.json says (written again, counted by hand), read without an .idx:
    the samples after the count were passed over without a word. A DataError naming the shard and the fix; in skip
    mode a warning, once a process (not at every epoch or resampled draw), and the counted samples train."""
    make_shards(tmp_path, [10, 10])
    (tmp_path / "sizes.json").write_text('{"s-000000.tar": 10, "s-000001.tar": 5}')
    s = stream(read_index(str(tmp_path)), 5, on_error=on_error)
    if on_error == "raise":
        message = epoch_error(s.epoch(0))
        assert "s-000001.tar holds more samples than the 5 sizes.json gives it" in message and "index-shards" in message
        return
    with caplog.at_level(logging.WARNING, logger="vegan_scale.data"):
        batches = list(s.epoch(0))
        again = list(s.epoch(1))
    assert sorted(batch_ids(batches)) == sorted(batch_ids(again)) == list(range(15)) and not skip_counts(batches)
    assert caplog.text.count("s-000001.tar holds more samples than the 5") == 1  # once, not at every epoch


def test_a_shard_of_exactly_its_count_reads_no_further(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The look past a shard's counted end finds its end: no warning, every sample once."""
    make_shards(tmp_path, [10, 5])
    with caplog.at_level(logging.WARNING, logger="vegan_scale.data"):
        batches = list(stream(read_index(str(tmp_path)), 5).epoch(0))
    assert sorted(batch_ids(batches)) == list(range(15)) and not caplog.text


def test_a_shard_drawn_in_part_keeps_its_index(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Resampled mode's last draw takes part of a shard; the shard's .idx was checked against that part's count, found
    not to fit, and passed over with a warning (the shard then read from its start)."""
    make_shards(tmp_path, [10], offsets=True)
    with caplog.at_level(logging.WARNING, logger="vegan_scale.data"):
        batches = list(stream(read_index(str(tmp_path)), 5, mode="resampled", epoch_samples=5).epoch(0))
    assert len(batches) == 1 and set(batch_ids(batches)) <= set(range(10)) and not caplog.text


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_remote_shard_cut_short_beside_its_index(tmp_path: Path, on_error: str) -> None:
    """A shard cut short on its server (a partial upload) with its .idx whole: the reader entering it past its end
    got HTTP 416, retried as a passing failure and then given up on with a DataError that skip mode could not skip,
    blaming "HTTP 416". It is a short shard: named as one, and in skip mode its lost samples are counted and the
    batches full, as for the same shard on disk."""
    urls = make_shards(tmp_path, [10, 10, 10], offsets=True)
    truncate(Path(urls[1]), Path(urls[1]).stat().st_size // 3)
    with serve(tmp_path) as server:
        index = read_index(f"{server.url}/s-{{000000..000002}}.tar")
        s = stream(index, 5, on_error=on_error, shuffle_buffer=0)
        if on_error == "raise":
            assert "shorter than its .idx says" in epoch_error(s.epoch(0))
            return
        batches = list(s.epoch(0))
    assert len(batches) == 6 and skip_counts(batches).get("short_shard", 0) > 0
    check_pixels(batches)


def test_images_read_at_start_follow_on_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The encoder's pre-training pool and the evaluation images are read at start: a shard cut short stopped the
    run there even with data.on_error=skip, whose use the error advised."""
    urls = make_shards(tmp_path, [6, 6, 6], side=28)
    truncate(Path(urls[1]), 3000)  # inside its second sample
    index = read_index(str(tmp_path))
    with pytest.raises(DataError, match=r"s-000001\.tar"):
        load_images(index, (1, 28, 28), 15)
    images, labels = load_images(index, (1, 28, 28), 15, on_error="skip")
    assert len(images) == len(labels) == 12  # the first shard's 6 and the last shard's 6
    assert "bad data passed over while reading 12 images" in caplog.text and "corrupt_shard" in caplog.text
