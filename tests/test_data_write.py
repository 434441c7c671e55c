"""Shard writing, read back with tarfile, numpy's npy reader and PIL; shard layouts counted by hand."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.shardkit import batch_ids, id_images, read_tar, sample_members, write_tar
from vegan_scale.data.images import load_images
from vegan_scale.data.index import read_index
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards
from vegan_scale.errors import ConfigError, DataError


def decode(ext: str, data: bytes) -> np.ndarray:
    """The independent readers: numpy for npy (no pickle), PIL for png and jpg."""
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    return np.asarray(Image.open(io.BytesIO(data)))


def read_back(directory: Path, prefix: str) -> list[tuple[str, np.ndarray, int | None]]:
    """(key, image, label or None) of every sample of every shard, in shard and member order."""
    out = []
    for shard in sorted(directory.glob(f"{prefix}-*.tar")):
        for name, data in read_tar(shard):
            key, ext = name.split(".", 1)
            if ext == "cls":
                assert out[-1][0] == key, f"label {name} does not follow its image"
                out[-1] = (key, out[-1][1], int(data))
            else:
                out.append((key, decode(ext, data), None))
    return out


def smooth_images(n: int, side: int = 16) -> np.ndarray:
    """RGB gradients (JPEG keeps them close; it does not keep noise)."""
    y, x = np.mgrid[0:side, 0:side]
    base = np.stack([x * 8, y * 8, (x + y) * 4], axis=-1)
    return np.stack([(base + 10 * i) % 200 for i in range(n)]).astype(np.uint8)


@pytest.mark.parametrize(("fmt", "channels"), [("npy", 1), ("npy", 3), ("png", 1), ("png", 3)])
def test_lossless_formats_round_trip(tmp_path, fmt, channels):
    """npy and png shards hold every image exactly, each followed by its label, keys in input order."""
    images = id_images(range(25), side=8, channels=channels, seed=3)
    labels = np.arange(25) * 7 % 10
    summary = write_shards(ArraySource(images, labels), tmp_path, prefix="t", fmt=fmt, samples_per_shard=10)
    assert (summary.shards, summary.samples) == (3, 25)
    assert summary.bytes == sum(p.stat().st_size for p in tmp_path.glob("*.tar"))
    samples = read_back(tmp_path, "t")
    assert [key for key, _, _ in samples] == [f"{i:09d}" for i in range(25)]
    for i, (_, image, label) in enumerate(samples):
        np.testing.assert_array_equal(image, images[i])
        assert label == labels[i]
    names = [n for p in sorted(tmp_path.glob("t-*.tar")) for n, _ in read_tar(p)]
    assert names[:2] == [f"000000000.{fmt}", "000000000.cls"]


def test_jpg_round_trip_is_close(tmp_path):
    """jpg shards hold each image within a small mean error (lossy), with labels."""
    images = smooth_images(6)
    write_shards(ArraySource(images, np.arange(6)), tmp_path, prefix="j", fmt="jpg", samples_per_shard=4)
    samples = read_back(tmp_path, "j")
    assert len(samples) == 6
    for i, (key, image, label) in enumerate(samples):
        assert key == f"{i:09d}" and label == i and image.shape == images[i].shape
        assert np.abs(image.astype(float) - images[i]).mean() < 2.0


def test_index_files(tmp_path):
    """sizes.json and dataset.json hold the hand-computed counts, shape and format."""
    write_shards(
        ArraySource(id_images(range(25), side=28), np.zeros(25, int)),
        tmp_path,
        prefix="t",
        samples_per_shard=10,
        description="here",
    )
    assert json.loads((tmp_path / "sizes.json").read_text()) == {
        "t-000000.tar": 10,
        "t-000001.tar": 10,
        "t-000002.tar": 5,
    }
    info = json.loads((tmp_path / "dataset.json").read_text())
    assert info == {"num_samples": 25, "image_shape": [1, 28, 28], "format": "npy", "labels": True, "source": "here"}


def test_rgb_unlabelled_via_load_images(tmp_path):
    """RGB images come back as [C, H, W] tensors equal to the input; unlabelled samples get label -1 and no .cls."""
    images = np.random.default_rng(0).integers(0, 256, size=(12, 8, 8, 3), dtype=np.uint8)
    write_shards(ArraySource(images), tmp_path, prefix="rgb", samples_per_shard=5)
    index = read_index(str(tmp_path))
    assert index.image_shape == (3, 8, 8) and index.counts == [5, 5, 2]
    got, labels = load_images(index, (3, 8, 8), limit=100)
    np.testing.assert_array_equal(got.numpy(), images.transpose(0, 3, 1, 2))
    assert labels.tolist() == [-1] * 12
    assert not any(name.endswith(".cls") for name, _ in read_tar(Path(index.urls[0])))


def test_deterministic_atomic_and_worker_count_free(tmp_path):
    """The same input written twice, and with 2 encoding processes, gives identical bytes, mtime 0, no .tmp."""
    source = ArraySource(id_images(range(30), side=8, channels=3, seed=1), np.arange(30) % 10)
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        write_shards(source, tmp_path / name, prefix="d", fmt="png", samples_per_shard=7, workers=workers)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(files) == 5 + 5 + 2  # shards, their offset indexes, sizes.json and dataset.json
    for other in ("b", "c"):
        assert sorted(p.name for p in (tmp_path / other).iterdir()) == files
        for name in files:
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / other / name).read_bytes(), (other, name)
    assert not list(tmp_path.rglob("*.tmp"))
    with tarfile.open(tmp_path / "a" / "d-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


class ListSource:
    """Images of different sizes (ArraySource needs one shape), all labelled 0."""

    def __init__(self, images: list[np.ndarray]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], 0


def test_max_shard_bytes_bounds_file_sizes(tmp_path):
    """Shard files stay within max_shard_bytes; a sample larger than the bound gets a shard of its own.

    Counted by hand: an 8x8 npy (128-byte header + 64 bytes) and its label take two 512-byte headers and two
    512-byte blocks, 2048 bytes; a tar file adds two zero blocks and is padded to 10240-byte records. Under a
    20480-byte bound a shard holds 9 small samples (9 * 2048 + 1024 = 19456). A 160x160 image alone takes 28672
    bytes before padding, so it is written alone, in a file over the bound."""
    small, big = np.zeros((8, 8), np.uint8), np.zeros((160, 160), np.uint8)
    images = [small] * 5 + [big] + [small] * 12
    write_shards(ListSource(images), tmp_path, prefix="m", samples_per_shard=None, max_shard_bytes=20480)
    sizes = json.loads((tmp_path / "sizes.json").read_text())
    assert list(sizes.values()) == [5, 1, 9, 3]
    files = {p.name: p.stat().st_size for p in sorted(tmp_path.glob("m-*.tar"))}
    assert list(files) == list(sizes)
    assert files["m-000001.tar"] == 30720  # the big sample: 28672 bytes rounded up to three records
    assert all(size <= 20480 for name, size in files.items() if name != "m-000001.tar")
    shapes = [image.shape for _, image, _ in read_back(tmp_path, "m")]
    assert shapes == [(8, 8)] * 5 + [(160, 160)] + [(8, 8)] * 12


def test_rewrite_removes_stale_shards_of_its_prefix(tmp_path):
    """Rewriting a directory with fewer shards deletes the old extra shards of that prefix only."""
    write_shards(ArraySource(id_images(range(50))), tmp_path, prefix="p", samples_per_shard=10)
    write_shards(ArraySource(id_images(range(5))), tmp_path, prefix="other", samples_per_shard=10)
    write_shards(ArraySource(id_images(range(15))), tmp_path, prefix="p", samples_per_shard=10)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["other-000000.tar", "p-000000.tar", "p-000001.tar"]
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"p-000000.tar": 10, "p-000001.tar": 5}
    assert len(read_back(tmp_path, "p")) == 15


class FailingSource(ListSource):
    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        if i == 15:
            raise OSError("unreadable image")
        return super().__getitem__(i)


def test_failed_rewrite_leaves_no_stale_index(tmp_path):
    """A rewrite that fails midway has already replaced the first shards; the old sizes.json must not describe
    them: reading the directory is a DataError saying sizes.json is missing, not a mix of two writes; and the shard
    being written is not left behind half done."""
    write_shards(ArraySource(id_images(range(30))), tmp_path, prefix="p", samples_per_shard=10)
    with pytest.raises(OSError, match="unreadable"):
        write_shards(FailingSource([np.zeros((8, 8), np.uint8)] * 30), tmp_path, prefix="p", samples_per_shard=10)
    with pytest.raises(DataError, match=r"sizes\.json is missing"):
        read_index(str(tmp_path))
    assert not list(tmp_path.glob("*.tmp"))  # the shard being written when it failed is removed, not left half done


def test_write_rejects_bad_arguments(tmp_path):
    """An unknown format, an empty source and shard sizes below one (which gave every sample a shard of its own:
    60,000 files for MNIST) are refused before anything is written."""
    two = ArraySource(id_images(range(2)))
    with pytest.raises(ConfigError, match="format"):
        write_shards(two, tmp_path / "x", prefix="x", fmt="gif")
    with pytest.raises(DataError, match="no samples"):
        write_shards(ArraySource(np.zeros((0, 4, 4), np.uint8)), tmp_path / "y", prefix="y")
    for sizes in ({"samples_per_shard": 0}, {"samples_per_shard": -5}, {"max_shard_bytes": 0}):
        with pytest.raises(ConfigError, match="at least one sample and one byte"):
            write_shards(two, tmp_path / "x", prefix="x", **sizes)
    with pytest.raises(ConfigError, match="at least one sample and one byte"):
        write_shards(two, tmp_path / "x", prefix="x", samples_per_shard=None, max_shard_bytes=-1_000_000)
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("*.tar"))


def test_offset_index_points_at_every_sample(tmp_path):
    """<shard>.idx: the offset of each sample's first member as tarfile finds it, then the end of the last."""
    source = ArraySource(id_images(range(23), side=8), np.arange(23) % 10)
    write_shards(source, tmp_path, prefix="d", samples_per_shard=10)
    for shard, count in json.loads((tmp_path / "sizes.json").read_text()).items():
        offsets = np.frombuffer((tmp_path / f"{shard}.idx").read_bytes(), dtype="<u8").tolist()
        with tarfile.open(tmp_path / shard) as tar:
            members = tar.getmembers()
        firsts = [m.offset for m in members if m.name.endswith(".npy")]
        assert offsets[:-1] == firsts and len(firsts) == count
        assert offsets[-1] == members[-1].offset_data + ((members[-1].size + 511) // 512) * 512


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_index_shards_of_another_tool(tmp_path, fmt):
    """`vegan-scale index-shards DIR` on tar files written by the standard library (long member names: GNU long
    name or PAX headers before the member's own) writes the counts and offsets tarfile finds; then a stream reads
    every sample from its offset."""
    from vegan_scale.data.pipeline import TrainStream

    long = "d" * 120 + "/"  # a 130-character name: beyond USTAR's 100 (and its prefix needs a short name part)
    prefix = long if fmt != tarfile.USTAR_FORMAT else ""
    images = id_images(range(17), side=8)
    for shard, ids in enumerate((range(0, 9), range(9, 17))):
        members = [(f"{prefix}{name}", data) for i in ids for name, data in sample_members(i, images[i])]
        write_tar(tmp_path / f"x-{shard}.tar", members, fmt=fmt)
    done = subprocess.run([sys.executable, "-m", "vegan_scale", "index-shards", str(tmp_path)], capture_output=True)
    assert done.returncode == 0 and b"2 shards, 17 samples" in done.stdout, done.stderr
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"x-0.tar": 9, "x-1.tar": 8}
    for shard in ("x-0.tar", "x-1.tar"):
        offsets = np.frombuffer((tmp_path / f"{shard}.idx").read_bytes(), dtype="<u8").tolist()
        with tarfile.open(tmp_path / shard) as tar:
            members = tar.getmembers()
        assert offsets[:-1] == [m.offset for m in members if m.name.endswith(".npy")]
        assert offsets[-1] == members[-1].offset_data + ((members[-1].size + 511) // 512) * 512
    stream = TrainStream(read_index(str(tmp_path), image_shape=(1, 8, 8)), (1, 8, 8), 4, seed=0, shuffle_buffer=8)
    ids = batch_ids(list(stream.epoch(0)))  # 4 batches of 4: one sample left out
    assert len(ids) == len(set(ids)) == 16 and set(ids) <= set(range(17))


def test_index_shards_refuses_an_empty_directory(tmp_path):
    from vegan_scale.data.write import index_shards
    from vegan_scale.errors import DataError

    with pytest.raises(DataError, match=r"no \*\.tar shards in"):
        index_shards(tmp_path)


@pytest.mark.parametrize("cut", [1024, 4096])
def test_index_shards_refuses_a_tar_cut_where_a_member_ends(tmp_path, cut):
    """A tar cut short on a member's boundary (a copy interrupted at a 512-byte block) read as a shorter, whole tar:
    sample 0 indexed without its label (cut at 1024), or 2 samples of 5 (at 4096). Without the closing blocks of
    zeros it is refused, naming the shard. A FIFO named .tar was called "empty (0 bytes)"."""
    from vegan_scale.data.write import index_shards

    members = [member for i in range(5) for member in sample_members(i, np.full((8, 8), i, np.uint8))]
    write_tar(tmp_path / "whole.tar", members)
    cut_dir, pipe_dir = tmp_path / "cut", tmp_path / "pipe"
    cut_dir.mkdir()
    (cut_dir / "a.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:cut])
    with tarfile.open(tmp_path / "whole.tar") as tar, tarfile.open(cut_dir / "a.tar") as cut_short:
        assert cut in {m.offset for m in tar.getmembers()} and cut_short.getmembers()  # tarfile reads it too
    with pytest.raises(DataError, match=r"a\.tar ends without the tar's closing blocks of zeros"):
        index_shards(cut_dir)
    assert not (cut_dir / "sizes.json").exists()
    pipe_dir.mkdir()
    os.mkfifo(pipe_dir / "b.tar")
    with pytest.raises(DataError, match=r"b\.tar is not a regular file"):
        index_shards(pipe_dir)


def test_index_shards_refuses_a_tar_whose_samples_are_split(tmp_path):
    """A directory archived unsorted lists a sample's members apart (its image, other samples, then its label):
    index-shards counted each part as a sample (40 samples as 80), and training failed later on "no image member".
    It names the sample and how to write the tar."""
    from vegan_scale.data.write import index_shards

    image = sample_members(0, np.zeros((8, 8), np.uint8))[0][1]
    write_tar(tmp_path / "a.tar", [("x/0.npy", image), ("x/1.npy", image), ("x/0.cls", b"3"), ("x/1.cls", b"4")])
    with pytest.raises(DataError, match=r"the members of sample 'x/0' are not next to each other .*--sort=name"):
        index_shards(tmp_path)
    assert not (tmp_path / "sizes.json").exists()


def test_ctrl_c_during_a_write_with_worker_processes_ends_it(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group) while `vegan-scale shards --workers 2` writes: a pool worker interrupted
    too ended, and the parent waited for its results for ever (2 times in 25). The workers leave Ctrl-C to the
    parent, which ends them: exit 130 every time, no partial shard and no sizes.json left."""
    import os
    import signal
    import time

    from tests.runkit import env

    np.savez(tmp_path / "images.npz", images=np.random.default_rng(0).integers(0, 256, (60_000, 28, 28), np.uint8))
    for attempt in range(4):
        out = tmp_path / f"out{attempt}"
        command = [sys.executable, "-m", "vegan_scale", "shards", "npz", "--source", str(tmp_path / "images.npz"),
                   "--out", str(out), "--workers", "2", "--format", "png", "--samples-per-shard", "500"]  # fmt: skip
        proc = subprocess.Popen(command, env=env(), start_new_session=True, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not list(out.glob("train/*.tar")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)  # writing: a shard is published
        time.sleep(0.1 * attempt)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        assert proc.returncode == 130, proc.stderr.read()[-2000:]
        assert not list(out.rglob("*.tmp")) and not list(out.rglob("sizes.json"))


@pytest.mark.parametrize(("link", "words"), [("-s", "a symbolic link"), ("", "a hard link")])
def test_index_shards_names_a_linked_member_and_how_to_archive_it(tmp_path, link, words):
    """GNU tar archives a symbolic link, and the second name of a hard-linked file, as a link member with no
    content; index-shards passed over such members (as webdataset does), so their samples vanished or lost their
    image. It names the member and the tar options that store the content, and the tar so written indexes whole."""
    files = tmp_path / "files"
    files.mkdir()
    for i in range(3):
        for name, data in sample_members(i, np.full((8, 8), i, np.uint8)):
            (files / name).write_bytes(data)
    (files / "00000001.npy").unlink()
    subprocess.run(["ln", *([link] if link else []), "00000000.npy", "00000001.npy"], cwd=files, check=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    archive = ["tar", "--sort=name", "-cf", str(shards / "a.tar"), "-C", str(files), "."]
    subprocess.run(archive, check=True)
    index = [sys.executable, "-m", "vegan_scale", "index-shards", str(shards)]

    refused = subprocess.run(index, capture_output=True, text=True)
    message = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "'./00000001.npy'" in message and words in message, message
    assert "--dereference --hard-dereference" in message and not (shards / "sizes.json").exists()

    subprocess.run([*archive[:2], "--dereference", "--hard-dereference", *archive[2:]], check=True)
    done = subprocess.run(index, capture_output=True, text=True)
    assert done.returncode == 0 and json.loads((shards / "sizes.json").read_text()) == {"a.tar": 3}, done.stderr
