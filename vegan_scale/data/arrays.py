"""Stretches of a shard whose samples share one layout, read as arrays: the training reader's fast path.

The reader (:mod:`vegan_scale.data.pipeline`) asks for samples ``skip`` to ``skip + take`` of a shard whose .idx it
holds. Parsing them member by member (:mod:`vegan_scale.data.shardio`, :mod:`vegan_scale.data.decode`) costs about
20 us of Python per sample, which on a small network is a large part of a training step's time on the cores the
two share. Shards written by ``vegan-scale shards`` as .npy images (and most shards of fixed-size raw arrays) repeat
one layout: the same members of the same sizes at the same places, only the key's digits, the labels, the pixels
and the checksums differing. Where the .idx spaces the wanted samples evenly, their bytes are read in one request
(a transient failure retried from the bytes already received) and checked as arrays for everything the
member-by-member path would check: each tar header at its place with a checksum that holds, the same name but for
the key's digits, the same size, type and prefix, one key for the members of a sample and a new key at each
sample, the same .npy header, labels written as digits. The first sample is read and decoded by the
member-by-member path itself, which vouches for the layout.

Anything else (a damaged header, a compressed image, a label with a sign, a missing shard) is not judged here:
:func:`read_stretch` returns None and the caller reads the stretch the ordinary way, which reports or skips
what is wrong as it always has. So the arrays are exactly what the ordinary path decodes (tests/test_data_arrays.py
compares the two on damaged shards), without Python work per sample.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vegan_scale.data.decode import SampleError, decode_sample, image_field, npy_header
from vegan_scale.data.faults import ShardError
from vegan_scale.data.shardio import BLOCK, iter_members, iter_tar_samples, read_range, split_name
from vegan_scale.retry import Backoff

MAX_LABEL_DIGITS = 18  # any such label fits int64
CHECKSUM = slice(148, 156)
EXACT = np.zeros(BLOCK, dtype=bool)  # the header bytes the ordinary path reads: name, size, type, magic, prefix
for _field in (slice(0, 100), slice(124, 136), slice(156, 157), slice(257, 262), slice(345, 500)):
    EXACT[_field] = True


def read_stretch(
    url: str, skip: int, take: int, offsets: Sequence[int], shape: tuple[int, int, int], backoff: Backoff
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Samples ``skip`` to ``skip + take`` of a shard as (uint8 images [take, C, H, W], int64 labels [take], -1
    where the samples have no label), or None where the member-by-member path must read them. A transient read
    failure is retried as the member path retries it (from the bytes already received), and a DataError when the
    tries run out, as there."""
    spots = np.asarray(offsets[skip : skip + take + 1], dtype=np.int64)
    stride = int(spots[1] - spots[0]) if take > 1 else 0
    if not stride or np.any(np.diff(spots) != stride):
        return None
    try:
        data = read_range(url, int(spots[0]), int(spots[-1]), backoff)
    except ShardError:  # missing or unreadable: the member path says so, or skips it
        return None
    if data is None or len(data) < take * stride:
        return None
    rows = np.frombuffer(data, dtype=np.uint8).reshape(take, stride)
    layout = _Layout.of(rows[0], url, shape)
    if layout is None or not layout.holds_for(rows):
        return None
    return layout.images(rows), layout.labels(rows)


@dataclass(frozen=True)
class _Member:
    """One tar member of a sample, where the first sample has it."""

    header: np.ndarray  # the first sample's header block of this member
    position: int  # of the header in a sample's bytes
    ext: str
    size: int

    @property
    def payload(self) -> slice:
        return slice(self.position + BLOCK, self.position + BLOCK + self.size)


@dataclass(frozen=True)
class _Layout:
    """One sample's layout (the first sample's, as the ordinary path reads it), and what may differ in others."""

    members: tuple[_Member, ...]
    key_length: int  # a member's name starts with the sample's key
    image: _Member  # a .npy member
    npy_header: np.ndarray  # its header's bytes
    npy_shape: tuple[int, ...]  # [H, W] or [H, W, C]

    @classmethod
    def of(cls, row: np.ndarray, url: str, shape: tuple[int, int, int]) -> _Layout | None:
        """The layout of ``row`` (one sample's bytes), read and decoded the ordinary way; None where it is not one
        this module reads (several samples, long names, a ustar prefix, an image that is not a C-order .npy of
        the expected shape, any failure)."""
        data = row.tobytes()
        try:
            found = list(iter_members(io.BytesIO(data), url, lambda name: True))
            samples = list(iter_tar_samples(io.BytesIO(data), url))
            if len(samples) != 1 or image_field(samples[0]) != "npy":
                return None
            image = decode_sample(samples[0], shape)[0]
            npy_shape, fortran, _, npy_length = npy_header(samples[0]["npy"])
        except (ShardError, SampleError, ValueError):
            return None
        members, position = [], 0
        for name, content, first in found:
            header = row[position : position + BLOCK]
            if first != position or header[:100].tobytes().split(b"\0", 1)[0].decode(errors="replace") != name:
                return None  # a long name or a non-file entry before the member
            if header[345:500].any() or header[CHECKSUM.start] & 0x80:
                return None  # a ustar prefix, a base-256 checksum
            members.append(_Member(header, position, split_name(name)[1], len(content)))
            position += BLOCK + len(content) + (-len(content) % BLOCK)
        if position != len(row) or fortran or len(npy_shape) not in (2, 3):
            return None
        chw = (1, *npy_shape) if len(npy_shape) == 2 else (npy_shape[2], *npy_shape[:2])
        if chw != tuple(image.shape):
            return None  # the ordinary path converts it (grey to colour)
        npy = next(m for m in members if m.ext == "npy")
        key = split_name(found[0][0])[0]
        return cls(tuple(members), len(key.encode()), npy, row[npy.payload][:npy_length].copy(), tuple(npy_shape))

    def holds_for(self, rows: np.ndarray) -> bool:
        """Whether every row (a sample's bytes) has this layout, as the member-by-member path reads it."""
        keys = None
        for member in self.members:
            header = rows[:, member.position : member.position + BLOCK]
            if not (self._names_and_fields_agree(member, header) and _checksums_hold(member.header, header)):
                return False
            member_keys = header[:, : self.key_length]
            if keys is not None and not np.array_equal(member_keys, keys):
                return False  # a member of another sample inside this one
            keys = member_keys
            payload = rows[:, member.payload]
            if member is self.image and not (payload[:, : len(self.npy_header)] == self.npy_header).all():
                return False
            if member.ext == "cls" and not (0 < member.size <= MAX_LABEL_DIGITS and _digits(payload).all()):
                return False
        return bool(np.any(keys[1:] != keys[:-1], axis=1).all())  # each sample its own key

    def _names_and_fields_agree(self, member: _Member, header: np.ndarray) -> bool:
        """The fields the ordinary path reads equal the first sample's, but for the key's digits (any digits)."""
        differs = (header != member.header) & EXACT
        varying = _digits(member.header[: self.key_length])
        differs[:, : self.key_length] &= ~(varying & _digits(header[:, : self.key_length]))
        return not differs.any()

    def images(self, rows: np.ndarray) -> torch.Tensor:
        start = self.image.payload.start + len(self.npy_header)
        pixels = rows[:, start : start + int(np.prod(self.npy_shape))].reshape(len(rows), *self.npy_shape)
        pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.array(pixels, order="C"))  # one copy: the pixels lie between headers

    def labels(self, rows: np.ndarray) -> torch.Tensor:
        cls = next((m for m in self.members if m.ext == "cls"), None)
        if cls is None:
            return torch.full((len(rows),), -1, dtype=torch.int64)
        digits = rows[:, cls.payload].astype(np.int64) - ord("0")
        return torch.from_numpy(digits @ 10 ** np.arange(cls.size - 1, -1, -1, dtype=np.int64))


def _checksums_hold(first: np.ndarray, header: np.ndarray) -> bool:
    """Each header's stored checksum (octal digits where the first sample's has them, its other bytes the same)
    equals the unsigned sum of its bytes, the checksum field counted as spaces (the ordinary path also accepts the
    signed sum some old writers used; such a shard is left to it)."""
    field, template = header[:, CHECKSUM], first[CHECKSUM]
    octal = _digits(template, "7") & (np.cumsum(template == 0) == 0)  # the digits the ordinary path reads
    if not ((field[:, ~octal] == template[~octal]).all() and _digits(field[:, octal], "7").all()):
        return False
    weights = 8 ** np.arange(int(octal.sum()) - 1, -1, -1, dtype=np.int64)
    stored = (field[:, octal].astype(np.int64) - ord("0")) @ weights
    computed = header.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64) + 8 * ord(" ")
    return bool((stored == computed).all())


def _digits(values: np.ndarray, highest: str = "9") -> np.ndarray:
    return (values >= ord("0")) & (values <= ord(highest))
