"""Safe decoding of shard samples into uint8 image tensors and integer labels.

Only image members (``npy``: raw arrays, ``png``, ``jpg``/``jpeg``) and integer labels (``cls``) are read. A
sample with a member whose only decoder is pickle is refused: it was not written for this pipeline and may be
hostile. ``npy`` is parsed with numpy's header reader and viewed with ``frombuffer``, never ``allow_pickle``; object
arrays are refused. Every failure is a :class:`SampleError` whose ``reason`` names the counter it is filed under
when bad samples are skipped.
"""

from __future__ import annotations

import functools
import io
import math

import numpy as np
import torch
from numpy.lib import format as npy_format
from PIL import Image

from vegan_scale.data.sources import in_channels
from vegan_scale.errors import DataError

IMAGE_EXTENSIONS = ("npy", "png", "jpg", "jpeg")
PICKLE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt", "mp", "msgpack")
SKIP_REASONS = (  # every ShardError's and SampleError's reason (tests/test_data_decode.py holds it to that)
    "missing_shard",
    "refused_shard",
    "corrupt_shard",
    "unreadable_shard",
    "short_shard",
    "unsafe_member",
    "no_image",
    "undecodable_image",
    "wrong_shape",
    "bad_label",
)


class WrongSize(ValueError):
    """A compressed image whose header gives another size than expected; ``shape`` is what it would decode to."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__(f"image of shape {shape}")
        self.shape = shape


class SampleError(DataError):
    """A bad sample; one-argument construction keeps it intact when a DataLoader worker re-raises it."""

    def __init__(self, message: str, reason: str = "bad_sample") -> None:
        super().__init__(message)
        self.reason = reason


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    stream = io.BytesIO(header)
    version = npy_format.read_magic(stream)
    read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return shape, fortran, dtype, stream.tell()


def npy_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, Fortran order, dtype, where the array's bytes start) of a .npy payload, read without pickle
    (headers are cached: shards repeat one shape)."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not a .npy payload")
    header_len = (
        10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
    )
    return _npy_header(bytes(data[:header_len]))


def decode_npy(data: bytes) -> np.ndarray:
    """A .npy payload as an array, without pickle."""
    shape, fortran, dtype, offset = npy_header(data)
    if dtype.hasobject:
        raise ValueError("object arrays need pickle")
    array = np.frombuffer(data, dtype=dtype, offset=offset, count=math.prod(shape))
    return array.reshape(shape, order="F" if fortran else "C")


def _to_chw(array: np.ndarray) -> torch.Tensor:
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)  # a writable copy of the (read-only) buffer


def decode_image(ext: str, data: bytes, channels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 [C, H, W] from one image member; grey images are expanded and colour converted to match ``channels``.
    With ``size`` (H, W), a compressed image of another size is refused from its header, before it is decoded (a
    damaged or hostile header may claim billions of pixels)."""
    if ext == "npy":
        array = decode_npy(data)
        if array.dtype != np.uint8:
            raise ValueError(f"array of {array.dtype}, expected uint8")
        if array.ndim not in (2, 3):
            raise ValueError(f"array of shape {array.shape}, expected [H, W] or [H, W, C]")
        tensor = _to_chw(array)
        if tensor.shape[0] == 1 and channels == 3:
            tensor = tensor.expand(3, -1, -1)
        return tensor
    with Image.open(io.BytesIO(data)) as img:
        if size is not None and img.size != (size[1], size[0]):
            raise WrongSize((channels, img.size[1], img.size[0]))
        return _to_chw(np.asarray(in_channels(img, channels)))


def decode_sample(sample: dict, shape: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
    """(uint8 image [C, H, W], label or -1) of one sample, or SampleError naming the shard, key and problem."""
    where = f"shard {sample.get('__url__')}, sample {sample.get('__key__')!r}"
    unsafe = [k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in PICKLE_EXTENSIONS]
    if unsafe:
        raise SampleError(
            f"{where}: member(s) {unsafe} would need pickle to decode; refused. Shards "
            "for vegan_scale hold images (npy/png/jpg) and .cls labels",
            reason="unsafe_member",
        )
    ext = image_field(sample)
    if ext is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        raise SampleError(f"{where}: no image member (expected one of {IMAGE_EXTENSIONS}, found {found})", "no_image")
    try:
        image = decode_image(ext, sample[ext], shape[0], shape[1:])
        found = tuple(image.shape)
    except WrongSize as e:
        found = e.shape
    except Exception as e:  # the bytes are data from outside: whatever the decoder trips over, the sample is bad
        raise SampleError(f"{where}: cannot decode its {ext} image ({e})", "undecodable_image") from None
    if found != tuple(shape):
        raise SampleError(
            f"{where}: image is {found} (C, H, W) but the config expects "
            f"{tuple(shape)}; set data.image_size and data.channels to match the shards",
            "wrong_shape",
        )
    return image, _label(sample, where)


def image_field(sample: dict) -> str | None:
    """The member a sample's image is decoded from (the first of IMAGE_EXTENSIONS it has), None without one."""
    return next((e for e in IMAGE_EXTENSIONS if e in sample), None)


def _label(sample: dict, where: str) -> int:
    if "cls" not in sample:
        return -1
    try:
        label = int(sample["cls"])
    except ValueError:
        raise SampleError(f"{where}: label {sample['cls'][:20]!r} is not an integer", "bad_label") from None
    if not -(2**63) <= label < 2**63:  # labels are batched as int64
        raise SampleError(f"{where}: label {sample['cls'][:20]!r} is out of the int64 range", "bad_label")
    return label
