"""Shard writing and the training stream, checked with tarfile + PIL read-backs and pixel-encoded sample indices."""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_images
from PIL import Image

from vegan_scale.data.pipeline import TrainStream, load_images
from vegan_scale.data.shards import ShardIndex, read_index, write_shards
from vegan_scale.errors import DataError

GREY = (1, 28, 28)


class _RunsShell:
    """Unpickling this calls os.system: what a hostile shard member would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    """A tar shard written with the standard library, independently of write_shards."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def make_index(directory: Path, sizes: list[int], side: int = 28) -> ShardIndex:
    """Shards of the given sizes whose images encode their global index (synthetic_images), labels index % 10."""
    directory.mkdir(parents=True, exist_ok=True)
    images = synthetic_images(sum(sizes), side=side)
    urls, start = [], 0
    for shard, n in enumerate(sizes):
        members = []
        for i in range(start, start + n):
            members += [(f"{i:08d}.png", png(images[i])), (f"{i:08d}.cls", str(i % 10).encode())]
        urls.append(write_tar(directory / f"s-{shard:06d}.tar", members))
        start += n
    return ShardIndex(urls, list(sizes), (1, side, side))


def sample_ids(images: torch.Tensor) -> list[int]:
    """The global sample index synthetic_images wrote into the first two pixels."""
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def read_epoch(stream: TrainStream, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(stream.epoch(epoch))


def ids_of(batches) -> list[int]:
    return [i for images, _ in batches for i in sample_ids(images)]


def epoch_error(stream: TrainStream) -> str:
    """The message of the DataError that reading epoch 0 raises. The loader is released here, by reference count:
    left to a garbage-collection pass, a DataLoader whose worker raised takes 5 s to shut down."""
    batches = stream.epoch(0)
    try:
        for _ in batches:
            pass
    except DataError as e:
        message = str(e)
        e.__traceback__ = None  # its frames hold the loader in a reference cycle
    else:
        pytest.fail("no DataError")
    del batches
    return message


def bad_shard(tmp_path: Path, members: list[tuple[str, bytes]]) -> ShardIndex:
    good = synthetic_images(4)
    base = []
    for i in range(4):
        base += [(f"{i:08d}.png", png(good[i])), (f"{i:08d}.cls", b"1")]
    url = write_tar(tmp_path / "bad-000000.tar", base[:2] + members + base[2:])
    return ShardIndex([url], [5], GREY)


# --- write_shards and read_index ---


def test_write_shards_round_trip_with_tarfile_and_pil(tmp_path):
    """Every member read back with tarfile and PIL equals its input image and label, in order."""
    images = synthetic_images(25, seed=3)
    labels = np.arange(25) * 7 % 10
    summary = write_shards(images, labels, tmp_path, prefix="t", samples_per_shard=10)
    assert (summary.shards, summary.samples) == (3, 25)
    assert summary.bytes == sum(p.stat().st_size for p in tmp_path.glob("*.tar"))
    seen = []
    for shard in sorted(tmp_path.glob("t-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "png":
                    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), images[int(key)])
                else:
                    assert ext == "cls" and int(data) == labels[int(key)]
                seen.append(member.name)
    assert sorted(seen) == sorted(f"{i:08d}.{ext}" for i in range(25) for ext in ("png", "cls"))
    keys = [name.split(".")[0] for name in seen]
    assert keys == sorted(keys)  # a sample's members are adjacent and samples keep the input order


def test_write_shards_index_files(tmp_path):
    """sizes.json and dataset.json hold the hand-computed counts and shape."""
    write_shards(synthetic_images(25), np.zeros(25, int), tmp_path, prefix="t", samples_per_shard=10, source="here")
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "t-000000.tar": 10,
        "t-000001.tar": 10,
        "t-000002.tar": 5,
    }
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info == {"num_samples": 25, "image_shape": [1, 28, 28], "labels": True, "source": "here"}


def test_write_shards_rgb_unlabelled_via_load_images(tmp_path):
    """RGB images come back as [C, H, W] tensors equal to the input; unlabelled samples get label -1."""
    images = np.random.default_rng(0).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    write_shards(images, None, tmp_path, prefix="rgb", samples_per_shard=5)
    index = read_index(str(tmp_path))
    assert index.image_shape == (3, 8, 8) and index.counts == [5, 5, 2]
    got, labels = load_images(index, (3, 8, 8), limit=100)
    np.testing.assert_array_equal(got.numpy(), images.transpose(0, 3, 1, 2))
    assert labels.tolist() == [-1] * 12
    with tarfile.open(index.urls[0]) as tar:
        assert not any(name.endswith(".cls") for name in tar.getnames())


def test_write_shards_deterministic_and_atomic(tmp_path):
    """The same input written to two directories gives identical bytes, fixed tar metadata and no .tmp files."""
    images, labels = synthetic_images(30, seed=1), np.arange(30) % 10
    for name in ("a", "b"):
        write_shards(images, labels, tmp_path / name, prefix="d", samples_per_shard=7)
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert not list(tmp_path.rglob("*.tmp"))
    with tarfile.open(tmp_path / "a" / "d-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_write_shards_rejects_bad_input(tmp_path):
    """Float images and a label count that differs from the image count are refused."""
    with pytest.raises(ValueError, match="uint8"):
        write_shards(np.zeros((2, 4, 4), np.float32), None, tmp_path, prefix="x")
    with pytest.raises(ValueError, match="labels"):
        write_shards(np.zeros((2, 4, 4), np.uint8), np.zeros(3), tmp_path, prefix="x")


def test_read_index_directory_and_pattern(tiny_shards):
    """A directory lists every shard in name order; a brace pattern lists just the shards it names."""
    index = read_index(str(tiny_shards / "train"))
    assert [Path(u).name for u in index.urls] == [f"tiny-train-{i:06d}.tar" for i in range(5)]
    assert index.counts == [100] * 5 and index.num_samples == 500 and index.image_shape == GREY
    part = read_index(str(tiny_shards / "train" / "tiny-train-{000001..000003}.tar"))
    assert [Path(u).name for u in part.urls] == [f"tiny-train-{i:06d}.tar" for i in (1, 2, 3)]
    assert part.num_samples == 300


def test_read_index_missing_directory(tmp_path):
    """A missing shard directory names that directory's sizes.json and how to write shards."""
    missing = tmp_path / "nope"
    with pytest.raises(DataError) as info:
        read_index(str(missing))
    assert str(missing / "sizes.json") in str(info.value) and "vegan-scale shards" in str(info.value)


def test_read_index_missing_shard(tiny_shards):
    """A shard listed in sizes.json but absent, or named by a pattern but unlisted, is named in the error."""
    (tiny_shards / "train" / "tiny-train-000003.tar").unlink()
    with pytest.raises(DataError, match=r"tiny-train-000003\.tar"):
        read_index(str(tiny_shards / "train"))
    with pytest.raises(DataError, match=r"tiny-test-000002\.tar"):
        read_index(str(tiny_shards / "test" / "tiny-test-{000000..000002}.tar"))
    (tiny_shards / "test" / "sizes.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        read_index(str(tiny_shards / "test"))


@pytest.mark.data
def test_real_mnist_shards_match_source(mnist_shards, mnist_wheel):
    """The MNIST shards hold the hash-checked wheel's images and labels in order (first samples of each split)."""
    from vegan_scale.data.sources import load_mnist

    train, test = load_mnist(mnist_wheel)
    for split, data, total in (("train", train, 60000), ("test", test, 10000)):
        index = read_index(str(mnist_shards / split))
        assert index.num_samples == total and index.image_shape == GREY
        images, labels = load_images(index, GREY, limit=300)
        np.testing.assert_array_equal(images[:, 0].numpy(), data.images[:300])
        np.testing.assert_array_equal(labels.numpy(), data.labels[:300])


# --- TrainStream: one rank ---


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_epoch_reads_every_sample_once(tiny_shards, num_workers):
    """One epoch on one process yields all 500 samples exactly once, with their own pixels and labels."""
    index = read_index(str(tiny_shards / "train"))
    stream = TrainStream(index, GREY, batch_size=50, seed=0, num_workers=num_workers, shuffle_buffer=100)
    batches = read_epoch(stream, 0)
    assert len(batches) == stream.plan(0).batches == 10 and stream.plan(0).dropped == 0
    ids = ids_of(batches)
    assert sorted(ids) == list(range(500))
    reference = synthetic_images(500, seed=len("train"))
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.shape == (50, *GREY)
        ids = sample_ids(images)
        np.testing.assert_array_equal(images[:, 0].numpy(), reference[ids])
        assert labels.tolist() == [i % 10 for i in ids]


def test_epoch_is_shuffled_within_shards(tiny_shards):
    """The shuffle buffer mixes samples: the order is neither the stored order nor shard-by-shard."""
    index = read_index(str(tiny_shards / "train"))
    ids = ids_of(read_epoch(TrainStream(index, GREY, 50, seed=0, shuffle_buffer=200), 0))
    assert ids != sorted(ids)
    first_batch_shards = {i // 100 for i in ids[:50]}
    assert len(first_batch_shards) > 1


@pytest.mark.parametrize("num_workers", [0, 2])
def test_order_depends_on_seed_and_epoch_only(tiny_shards, num_workers):
    """Same seed and epoch: identical batches (also with loader processes); another epoch or seed: another order."""
    index = read_index(str(tiny_shards / "train"))

    def run(seed: int, epoch: int):
        return read_epoch(TrainStream(index, GREY, 50, seed=seed, num_workers=num_workers, shuffle_buffer=100), epoch)

    first, again = run(0, 0), run(0, 0)
    assert len(first) == len(again)
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    reference = ids_of(first)
    assert ids_of(run(0, 1)) != reference
    assert ids_of(run(1, 0)) != reference
    assert sorted(ids_of(run(0, 1))) == sorted(reference)


# --- TrainStream: several ranks, simulated in one process ---


@pytest.mark.parametrize(
    ("sizes", "batch_size", "num_workers"),
    [([100] * 5, 20, 0), ([100, 100, 100, 37, 3], 10, 0), ([100, 100, 100, 37, 3], 10, 2)],
)
def test_ranks_equal_disjoint_and_accounted(tmp_path, sizes, batch_size, num_workers):
    """Two ranks yield the same number of batches, read disjoint samples from their own shards, and
    read + dropped samples add up to the data set."""
    index = make_index(tmp_path, sizes)
    starts = np.cumsum([0, *sizes])
    shard_of = {i: s for s in range(len(sizes)) for i in range(starts[s], starts[s + 1])}
    for epoch in (0, 1) if num_workers else (0, 1, 2, 3):
        streams = [TrainStream(index, GREY, batch_size, 7, r, 2, num_workers, shuffle_buffer=50) for r in (0, 1)]
        plans = [s.plan(epoch) for s in streams]
        assigned = [sorted(i for w in p.worker_shards for i in w) for p in plans]
        assert sorted(assigned[0] + assigned[1]) == list(range(len(sizes)))  # every shard to exactly one rank
        capacity = [sum(sizes[i] for i in a) // batch_size for a in assigned]
        if num_workers == 0:
            assert plans[0].batches == plans[1].batches == min(capacity)
        ids = []
        for stream, plan, mine in zip(streams, plans, assigned, strict=True):
            batches = read_epoch(stream, epoch)
            assert len(batches) == plan.batches > 0
            assert all(len(labels) == batch_size for _, labels in batches)
            rank_ids = ids_of(batches)
            assert {shard_of[i] for i in rank_ids} <= set(mine)
            ids.append(rank_ids)
        assert plans[0].batches == plans[1].batches
        assert not set(ids[0]) & set(ids[1])
        assert len(set(ids[0])) == len(ids[0]) and len(set(ids[1])) == len(ids[1])
        read = sum(p.batches * batch_size for p in plans)
        assert read + sum(p.dropped for p in plans) == sum(sizes)


def test_too_few_shards_for_readers(tiny_shards):
    """5 shards cannot feed 3 processes x 2 workers (DataError with the numbers), nor 2 ranks batches of 300."""
    index = read_index(str(tiny_shards / "train"))
    with pytest.raises(DataError) as info:
        TrainStream(index, GREY, 10, 0, rank=0, world_size=3, num_workers=2)
    msg = str(info.value)
    assert "5 shard(s)" in msg and "3 process(es)" in msg and "2 loader worker(s)" in msg
    with pytest.raises(DataError, match="no full batch"):
        TrainStream(index, GREY, 300, 0, rank=0, world_size=2)


# --- TrainStream: hostile or malformed shards ---


@pytest.mark.parametrize("ext", ["pyd", "pth", "weights.pickle"])
def test_pickle_member_refused(tmp_path, ext):
    """A sample carrying a member only pickle could decode is refused, naming the shard; nothing is unpickled."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsShell(marker))
    index = bad_shard(tmp_path, [("00000009.png", png(synthetic_images(1)[0])), (f"00000009.{ext}", payload)])
    message = epoch_error(TrainStream(index, GREY, 1, 0, shuffle_buffer=1))
    assert index.urls[0] in message and "pickle" in message
    with pytest.raises(DataError):
        load_images(index, GREY, 10)
    assert not marker.exists()


def test_pickle_member_refused_in_loader_worker(tmp_path):
    """The refusal survives the DataLoader worker boundary as a DataError (the default data.num_workers is 1)."""
    index = bad_shard(tmp_path, [("00000009.png", png(synthetic_images(1)[0])), ("00000009.pth", b"\x80\x04N.")])
    message = epoch_error(TrainStream(index, GREY, 1, 0, num_workers=1, shuffle_buffer=1))
    assert index.urls[0] in message and "pickle" in message


def test_invalid_png_names_shard_and_key(tmp_path):
    """A member that is not a valid image is a DataError naming the shard and the sample key."""
    index = bad_shard(tmp_path, [("00000009.png", b"\x89PNG\r\n\x1a\n garbage")])
    message = epoch_error(TrainStream(index, GREY, 1, 0, shuffle_buffer=1))
    assert index.urls[0] in message and "'00000009'" in message and "cannot decode image" in message


@pytest.mark.parametrize(
    ("member", "words"), [(("00000009.cls", b"7"), "no image member"), (("00000009.cls", b"x"), "not an integer")]
)
def test_sample_without_image_or_with_bad_label(tmp_path, member, words):
    """A sample without an image, or with a non-integer label, is a DataError naming the shard."""
    extra = [member] if words == "no image member" else [("00000009.png", png(synthetic_images(1)[0])), member]
    index = bad_shard(tmp_path, extra)
    message = epoch_error(TrainStream(index, GREY, 1, 0, shuffle_buffer=1))
    assert words in message and index.urls[0] in message


def test_wrong_image_shape_says_which_keys_to_set(tmp_path):
    """32x32 shards read as 28x28 give a DataError telling to set data.image_size and data.channels."""
    index = make_index(tmp_path, [4], side=32)
    message = epoch_error(TrainStream(ShardIndex(index.urls, index.counts, GREY), GREY, 2, 0))
    assert "data.image_size" in message and "data.channels" in message and index.urls[0] in message
