"""Reading the epoch's sample sequence S (:mod:`vegan_scale.data.order`) for one reader: stretches of it decoded
into arrays, bad samples (``data.on_error=skip``) counted once and replaced by a rule on S alone.

A stretch of a shard whose samples share one layout is read as arrays (:mod:`vegan_scale.data.arrays`); any other,
or one that does not pass its checks, member by member, where damage is found, named and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from vegan_scale.data.arrays import read_stretch
from vegan_scale.data.decode import SampleError, decode_sample
from vegan_scale.data.faults import ShortShard
from vegan_scale.data.index import read_offsets
from vegan_scale.data.order import EpochOrder, pieces
from vegan_scale.data.shardio import Sample, ShardError, ShardMissing, read_samples
from vegan_scale.errors import DataError
from vegan_scale.retry import Backoff

log = logging.getLogger("vegan_scale.data")

Item = tuple[torch.Tensor, int]  # a decoded sample: image, label


@dataclass(frozen=True)
class Stretch:
    """Consecutive samples of S decoded: images uint8 [n, C, H, W], labels [n], and which are good (a bad sample's
    row is zeros)."""

    images: torch.Tensor
    labels: torch.Tensor
    good: torch.Tensor

    @classmethod
    def of(cls, items: list[Item | None], shape: tuple[int, int, int]) -> Stretch:
        blank = torch.zeros(shape, dtype=torch.uint8)
        return cls(
            torch.stack([blank if item is None else item[0] for item in items]),
            torch.tensor([-1 if item is None else item[1] for item in items], dtype=torch.int64),
            torch.tensor([item is not None for item in items], dtype=torch.bool),
        )

    @classmethod
    def cat(cls, parts: list[Stretch]) -> Stretch:
        if len(parts) == 1:
            return parts[0]
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("images", "labels", "good")))

    def __getitem__(self, rows: slice | torch.Tensor) -> Stretch:
        return Stretch(self.images[rows], self.labels[rows], self.good[rows])

    def __len__(self) -> int:
        return len(self.good)


class SequenceReader:
    """One reader's access to the epoch's sample sequence S: stretches of it decoded, bad samples (skip mode)
    counted once, by the reader of the lane that holds them, and replaced.

    A lane's k-th bad element (in stored order) is replaced by the k-th good sample of S after the lane's end
    (wrapping around the epoch): a rule on S alone, so the batches are the same at every world size and worker
    count, and a whole lost shard costs its samples, not the run."""

    def __init__(
        self,
        order: EpochOrder,
        sizes: dict[str, int],
        shape: tuple[int, int, int],
        on_error: str,
        retry: Backoff,
        entering: Callable[[str], None] = lambda url: None,
    ) -> None:
        self.order, self.shape, self.on_error, self.retry = order, shape, on_error, retry
        # each shard's sample count, as sizes.json gives it: the order's may be fewer (resampled mode's last draw)
        self.sizes = sizes
        self.entering = entering  # told each shard the reader starts reading (to name a stalled read)
        self.offsets: dict[str, list[int] | None] = {}  # the .idx of each shard met, read once per epoch
        self.skipped: dict[str, int] = {}  # bad samples of the current block, by reason

    def lanes(self, j: int, lanes: range, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``j``'s ``lanes`` (consecutive): images [lane, element in stored order, C, H, W] and labels
        [lane, element], bad samples replaced."""
        start = self.order.block(j * self.order.batches_per_block)[1] * self.order.global_batch + lanes.start * length
        flat = self.read(start, len(lanes) * length, self.skipped)
        images = flat.images.view(len(lanes), length, *flat.images.shape[1:])
        labels = flat.labels.view(len(lanes), length)
        if flat.good.all():
            return images, labels
        for q in range(len(lanes)):
            bad = ~flat.good[q * length : (q + 1) * length]
            if bad.any():
                found = self.good_after(flat[(q + 1) * length :], start + len(flat), int(bad.sum()))
                images[q][bad], labels[q][bad] = found.images, found.labels
        return images, labels

    def good_after(self, rest: Stretch, position: int, count: int) -> Stretch:
        """The first ``count`` good samples of ``rest`` and then of S from ``position`` on, wrapping around the
        epoch; a DataError after a whole pass without enough. S is read ahead in chunks that start at twice the
        count and double: little is read (and read again later) when few samples are bad, and a long run of bad
        ones takes few reads."""
        found, have, seen = [rest[rest.good]], int(rest.good.sum()), 0
        total, chunk, skipped = self.order.samples, 2 * count, {}
        while have < count:
            if seen >= total:
                why = ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items()))
                raise DataError(
                    f"epoch {self.order.epoch}: too few samples of {self.order.urls[0]} ... decode to fill a batch "
                    f"({have} of {count}; skipped: {why or 'none'}); rewrite the shards, or check data.channels and "
                    "data.image_size against them"
                )
            at = (position + seen) % total
            take = min(chunk, total - at, total - seen)
            more = self.read(at, take, skipped)
            found.append(more[more.good])
            have, seen, chunk = have + len(found[-1]), seen + take, 2 * chunk
        return Stretch.cat(found)[:count]

    def read(self, start: int, length: int, skipped: dict[str, int]) -> Stretch:
        """Samples [start, start + length) of S, decoded; a bad one (skip mode) counted in ``skipped``. A stretch
        of a shard whose samples share one layout is read as arrays (:mod:`vegan_scale.data.arrays`); any other,
        or one that does not pass its checks, sample by sample."""
        parts = []
        for url, skip, take in pieces(self.order.urls, self.order.counts, start, length):
            self.entering(url)  # before its .idx is fetched: a stall there names the shard too
            if url not in self.offsets:
                self.offsets[url] = read_offsets(url, self.sizes[url])
            offsets = self.offsets[url]
            arrays = read_stretch(url, skip, take, offsets, self.shape, self.retry) if offsets is not None else None
            if arrays is not None:
                parts.append(Stretch(*arrays, torch.ones(take, dtype=torch.bool)))
                continue
            found, got, reason = [], 0, None
            to_end = offsets is None and skip + take == self.sizes[url]
            for sample in _shard_samples(url, skip, take, offsets, self.on_error, self.retry, to_end):
                reason = sample.get("__error__", reason)
                found.append(_decode(sample, self.shape, self.on_error, skipped))
                got += 1
            if got < take:  # the rest of a damaged shard, read without its offsets: lost, under the error's reason
                skipped[reason] = skipped.get(reason, 0) + take - got
                found.extend([None] * (take - got))
            parts.append(Stretch.of(found, self.shape))
        return Stretch.cat(parts)


def _shard_samples(
    url: str, skip: int, take: int, offsets: list[int] | None, on_error: str, retry: Backoff, to_end: bool = False
) -> Iterator[Sample]:
    """Samples ``skip`` to ``skip + take`` of one shard. In skip mode a shard error is an error marker in place of
    the sample it hit: with the shard's offsets the reading goes on at the next sample, without them the rest of
    the piece is lost (the caller counts it). ``to_end``: the piece ends where sizes.json says the shard ends, and
    is read without the shard's offsets (whose length checks the count): a sample after it is one the count leaves
    out, which no reader would ever read (:func:`_uncounted`)."""
    position, end = skip, skip + take
    while position < end:
        try:
            for sample in read_samples(url, retry, position, None if to_end else end - position, offsets):
                if position == end:
                    _uncounted(url, end, on_error)
                    return
                position += 1
                yield sample
            if position < end:
                raise ShortShard(
                    f"shard {url} holds {position} samples but sizes.json promises at least {end}; rewrite the "
                    "shards or their sizes.json"
                )
        except ShardError as e:
            if on_error == "raise":
                raise
            log.warning("skipping %s of %s: %s", "a sample" if offsets else "the rest", url, e)
            yield {"__key__": None, "__url__": url, "__error__": e.reason}
            if offsets is None or isinstance(e, (ShortShard, ShardMissing)):
                return
            position += 1  # enter the shard again at the next sample


def _uncounted(url: str, count: int, on_error: str) -> None:
    """A shard holds more samples than the ``count`` sizes.json gives it (a shard written again, a count made by
    hand): the ones after the count would be passed over without a word. A DataError, or in skip mode a warning
    (every sample read is good; the run trains on the counted ones), once a process for each shard."""
    message = (
        f"shard {url} holds more samples than the {count} sizes.json gives it: the ones after them are never read; "
        "count them again with `vegan-scale index-shards DIRECTORY`"
    )
    if on_error == "raise":
        raise DataError(message + ", or set data.on_error=skip to train on the counted ones")
    if url not in _UNCOUNTED_SAID:
        _UNCOUNTED_SAID.add(url)
        log.warning("%s", message)


_UNCOUNTED_SAID: set[str] = set()  # the shards :func:`_uncounted` warned of in this process: once, not every epoch


def _decode(sample: Sample, shape: tuple[int, int, int], on_error: str, skipped: dict[str, int]) -> Item | None:
    """A sample decoded; None (counted in ``skipped``) where it is bad and ``on_error`` is skip."""
    if "__error__" in sample:
        skipped[sample["__error__"]] = skipped.get(sample["__error__"], 0) + 1
        return None
    try:
        return decode_sample(sample, shape)
    except SampleError as e:
        if on_error == "raise":
            raise
        skipped[e.reason] = skipped.get(e.reason, 0) + 1
        return None
