"""The order of the training samples: a function of (seed, epoch, step) alone, whatever the number of processes and
loader workers that read it.

An epoch is one sequence S of samples: the shards permuted by (seed, epoch) and read one after the other (epoch
mode), or shards drawn with replacement, sources weighted, by (seed, epoch) until the epoch's sample count
(resampled mode). The global batch is B samples; the epoch has T = len(S) // B of them (the last len(S) - T B
samples, fewer than a global batch, are left out). Batches are formed in blocks of L at a time
(L = ceil(shuffle_buffer / B)): block j covers L B consecutive samples of S, cut into B *lanes* of L consecutive
samples; position q of each of the block's L batches is an element of lane q, lane q's elements taken in an order
permuted by (seed, epoch, j). So every batch draws one sample from each of B stretches spread over L B samples of
S, and the sample shuffle spans at least ``shuffle_buffer`` samples, as a shuffle buffer of that size would.

Which process reads what follows from positions alone. Rank r of W takes positions [r B/W, (r+1) B/W) of every
batch (its contiguous slice), so it reads exactly those lanes: one contiguous stretch of S per block. Its K loader
workers split its lanes into K contiguous groups. No sample is read twice, none is read by a process that does not
train on it, and the batch a rank trains on at step s is its slice of the same global batch at every W and K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from vegan_scale.data.index import ShardIndex
from vegan_scale.errors import DataError
from vegan_scale.seeds import mix_seed

MAX_DRAWS = 1_000_000  # shards drawn for one resampled epoch, its order built whole at its start (about 10 s)

Piece = tuple[str, int, int]  # (shard url, samples to pass over, samples to take)


@dataclass(frozen=True)
class EpochOrder:
    """The sample sequence S of one epoch, as consecutive whole shards, and how it is cut into batches."""

    seed: int
    epoch: int
    urls: tuple[str, ...]  # the shards of S, in order (a shard may come twice in resampled mode)
    counts: tuple[int, ...]
    global_batch: int
    batches_per_block: int  # L

    @property
    def samples(self) -> int:
        return sum(self.counts)

    @property
    def steps(self) -> int:
        """Global batches in the epoch."""
        return self.samples // self.global_batch

    @property
    def dropped(self) -> int:
        return self.samples - self.steps * self.global_batch

    def block(self, step: int) -> tuple[int, int, int]:
        """(block, its first step, its number of batches) of ``step``."""
        j = step // self.batches_per_block
        first = j * self.batches_per_block
        return j, first, min(self.batches_per_block, self.steps - first)

    def lane_pieces(self, j: int, lanes: range) -> list[Piece]:
        """The shard pieces holding ``lanes`` (consecutive lanes) of block ``j``: one stretch of S."""
        _, first, length = self.block(j * self.batches_per_block)
        start = first * self.global_batch + lanes.start * length
        return pieces(self.urls, self.counts, start, len(lanes) * length)

    def lane_orders(self, j: int, lanes: range) -> np.ndarray:
        """[len(lanes), L_j]: for each of ``lanes``, the order in which the block's batches take its elements."""
        _, _, length = self.block(j * self.batches_per_block)
        keys = torch.rand(
            self.global_batch, length, generator=torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, j))
        )
        return keys[lanes.start : lanes.stop].argsort(dim=1).numpy()


def pieces(urls: tuple[str, ...], counts: tuple[int, ...], start: int, length: int) -> list[Piece]:
    """The (url, skip, take) pieces of samples [start, start + length) of the shards read one after the other."""
    found, offset = [], 0
    for url, count in zip(urls, counts, strict=True):
        lo, hi = max(start, offset), min(start + length, offset + count)
        if lo < hi:
            found.append((url, lo - offset, hi - lo))
        offset += count
    return found


def epoch_order(
    index: ShardIndex, seed: int, epoch: int, mode: str, epoch_samples: int | None, global_batch: int, shuffle: int
) -> EpochOrder:
    """Epoch ``epoch``'s sample sequence: the permuted shards (epoch mode) or seeded weighted draws of shards until
    ``epoch_samples`` (resampled mode; default the data set's size)."""
    if not index.has_counts:
        raise DataError(
            f"the sample counts of {[s.spec for s in index.sources if s.counts is None]} are unknown: the training "
            "order needs them; write a sizes.json beside the shards with `vegan-scale index-shards DIRECTORY`"
        )
    urls, counts = index.urls, index.counts
    batches_per_block = max(1, math.ceil(shuffle / global_batch))
    rng = np.random.default_rng([seed, epoch])
    if mode == "epoch":
        order = rng.permutation(len(urls))
        return EpochOrder(seed, epoch, tuple(urls[i] for i in order), tuple(counts[i] for i in order),
                          global_batch, batches_per_block)  # fmt: skip
    wanted = epoch_samples or index.num_samples
    # skip_missing may have left a source without shards; one whose shards hold no sample can never be drawn from
    sources = [src for src in index.sources if src.urls and sum(src.counts) > 0]
    if not sources:
        raise DataError(
            f"the training shards of {[s.spec for s in index.sources]} hold no samples (their sizes.json counts "
            "are all 0): nothing can be drawn in resampled mode; write the shards again, or check their sizes.json"
        )
    weights = np.array([src.weight for src in sources]) / sum(src.weight for src in sources)
    per_draw = sum(w * sum(src.counts) / len(src.urls) for w, src in zip(weights, sources, strict=True))
    if wanted / per_draw > MAX_DRAWS:  # 10^12 samples drew shards for hours, deaf to a stop, memory growing
        raise DataError(
            f"data.epoch_samples={wanted} would draw about {wanted / per_draw:.3g} shards for every epoch (of "
            f"{per_draw:.3g} samples on average), more than {MAX_DRAWS:,}: an epoch's order is made whole when it "
            f"starts; use at most {math.floor(MAX_DRAWS * per_draw)} (an epoch is only what the schedule counts: "
            "train.max_steps sets the run's length)"
        )
    drawn: list[tuple[str, int]] = []
    total = 0
    while total < wanted:
        source = sources[rng.choice(len(sources), p=weights)]
        i = rng.integers(len(source.urls))
        take = min(source.counts[i], wanted - total)
        drawn.append((source.urls[i], take))
        total += take
    return EpochOrder(seed, epoch, tuple(u for u, _ in drawn), tuple(c for _, c in drawn), global_batch,
                      batches_per_block)  # fmt: skip


def rank_lanes(global_batch: int, world_size: int, rank: int) -> range:
    """The positions of every global batch rank ``rank`` of ``world_size`` trains on."""
    share = global_batch // world_size
    return range(rank * share, (rank + 1) * share)


def worker_lanes(lanes: range, workers: int, worker: int) -> range:
    """Worker ``worker``'s contiguous group of a rank's lanes (the first ``len % workers`` groups one larger)."""
    size, extra = divmod(len(lanes), workers)
    start = lanes.start + worker * size + min(worker, extra)
    return range(start, start + size + (worker < extra))
