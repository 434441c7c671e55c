"""Sample decoding: images written by numpy and PIL, hostile and malformed members, and the reason of each failure."""

from __future__ import annotations

import pickle
import struct
import zlib

import numpy as np
import pytest
import torch

from tests.shardkit import RunsShell, image_bytes, npy_bytes
from vegan_scale.data.decode import SKIP_REASONS, SampleError, decode_sample

URL = "/data/shard-000007.tar"


def sample(**members: bytes) -> dict:
    return {"__key__": "000042", "__url__": URL, **{k.replace("_", "."): v for k, v in members.items()}}


def chw(array: np.ndarray) -> np.ndarray:
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


RNG = np.random.default_rng(0)
GREY = RNG.integers(0, 256, size=(6, 5), dtype=np.uint8)
RGB = RNG.integers(0, 256, size=(6, 5, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("ext", "encode"), [("npy", npy_bytes), ("png", lambda a: image_bytes(a, "png"))], ids=["npy", "png"]
)
@pytest.mark.parametrize("image", [GREY, RGB], ids=["grey", "rgb"])
def test_lossless_images_decode_exactly(ext, encode, image):
    """npy and png members decode to the written pixels as uint8 [C, H, W], with the .cls label."""
    got, label = decode_sample(sample(**{ext: encode(image)}, cls=b"7"), chw(image).shape)
    assert got.dtype == torch.uint8 and label == 7
    np.testing.assert_array_equal(got.numpy(), chw(image))


def test_jpg_and_fortran_npy():
    """jpg decodes close to the written pixels (lossy); a Fortran-ordered npy array keeps its values."""
    smooth = np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 4
    for ext in ("jpg", "jpeg"):
        got, label = decode_sample(sample(**{ext: image_bytes(smooth, "jpg")}), (1, 16, 16))
        assert label == -1 and np.abs(got.numpy()[0].astype(float) - smooth).mean() < 2
    got, _ = decode_sample(sample(npy=npy_bytes(np.asfortranarray(RGB))), (3, 6, 5))
    np.testing.assert_array_equal(got.numpy(), chw(RGB))


def test_grey_expanded_to_three_channels():
    """A grey npy or png read where 3 channels are expected repeats its one channel."""
    for data in (npy_bytes(GREY), image_bytes(GREY, "png")):
        got, _ = decode_sample(sample(npy=data) if data[:6] == b"\x93NUMPY" else sample(png=data), (3, 6, 5))
        np.testing.assert_array_equal(got.numpy(), np.stack([GREY] * 3))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height grey pixels (its data is a few bytes): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def reason_of(s: dict, shape=(1, 6, 5)) -> tuple[str, str]:
    with pytest.raises(SampleError) as info:
        decode_sample(s, shape)
    assert info.value.reason in SKIP_REASONS
    return info.value.reason, str(info.value)


def test_object_npy_refused_without_running_it(tmp_path):
    """An object-dtype npy (its payload a pickle that would create a file) is undecodable; nothing runs."""
    marker = tmp_path / "pwned"
    evil = np.empty(1, dtype=object)
    evil[0] = RunsShell(marker)
    data = npy_bytes(evil, allow_pickle=True)
    assert b"system" in data  # the pickled call to os.system
    reason, message = reason_of(sample(npy=data))
    assert reason == "undecodable_image" and "object" in message and URL in message
    assert not marker.exists()


@pytest.mark.parametrize("ext", ["pyd", "pth", "pkl", "pickle", "weights.pickle", "pt"])
def test_pickle_members_refused(tmp_path, ext):
    """A sample with a member only pickle could decode is refused before any decoding, naming shard and key."""
    marker = tmp_path / "pwned"
    reason, message = reason_of(sample(npy=npy_bytes(GREY), **{ext.replace(".", "_"): pickle.dumps(RunsShell(marker))}))
    assert reason == "unsafe_member"
    assert URL in message and "'000042'" in message and "pickle" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    ("members", "reason", "words"),
    [
        ({"cls": b"3", "txt": b"hello"}, "no_image", "no image member"),
        ({"png": b"\x89PNG\r\n\x1a\n garbage"}, "undecodable_image", "cannot decode its png image"),
        ({"npy": b"\x93NUMPY\x01\x00garbage"}, "undecodable_image", "cannot decode its npy image"),
        ({"npy": npy_bytes(GREY.astype(np.float32))}, "undecodable_image", "float32"),
        ({"npy": npy_bytes(GREY.reshape(-1))}, "undecodable_image", "expected [H, W] or [H, W, C]"),
        ({"npy": npy_bytes(GREY[None, :, :, None])}, "undecodable_image", "expected [H, W] or [H, W, C]"),
        ({"png": png_header_only(30000, 30000)}, "undecodable_image", "decompression bomb"),
        ({"npy": npy_bytes(GREY), "cls": b"x"}, "bad_label", "not an integer"),
        ({"npy": npy_bytes(GREY), "cls": b"9" * 30}, "bad_label", "int64"),
    ],
    ids=["no_image", "bad_png", "bad_npy", "float_npy", "flat_npy", "4d_npy", "png_bomb", "bad_label", "huge_label"],
)
def test_malformed_samples(members, reason, words):
    """Each malformed sample is a SampleError with its reason, naming the shard, the key and the problem."""
    got, message = reason_of(sample(**members))
    assert got == reason and words in message and URL in message and "'000042'" in message


@pytest.mark.parametrize(
    ("image", "shape"), [(GREY, (1, 6, 6)), (RGB, (1, 6, 5)), (np.zeros((6, 5, 4), np.uint8), (3, 6, 5))]
)
def test_wrong_shape_says_which_keys_to_set(image, shape):
    """An image of another size or channel count (RGB where grey is expected, RGBA npy) is wrong_shape, and the
    message says to set data.image_size and data.channels."""
    reason, message = reason_of(sample(npy=npy_bytes(image)), shape)
    assert reason == "wrong_shape" and "data.image_size" in message and "data.channels" in message


def test_every_shard_fault_is_counted_under_its_reason() -> None:
    """The skip counts keep one slot per reason in SKIP_REASONS: a reason missing there was dropped from the counts
    without a word (a shard refused with HTTP 403 was skipped and counted nowhere)."""
    from vegan_scale.data.faults import ShardError

    def family(cls: type) -> list[type]:
        return [cls, *(c for sub in cls.__subclasses__() for c in family(sub))]

    assert {cls.reason for cls in family(ShardError)} <= set(SKIP_REASONS)
