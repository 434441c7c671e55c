"""Multi-process checks of the foundation: agreement between ranks and the rank-equal data stream."""

from __future__ import annotations

import time

import numpy as np
import torch

from tests.multiproc.harness import Context, check
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards
from vegan_scale.distributed.agreement import Agreement, Flag


@check
def agreement_sees_one_ranks_flag(ctx: Context) -> dict:
    """Rank 1 raises NONFINITE_PENALTY at step 7 and rank 0 at step 9: after one check every rank sees the flag
    with the earliest step, and no other flag."""
    agreement = Agreement(ctx.accelerator.device, ctx.world_size)
    before = agreement.check()
    agreement.raise_if(Flag.NONFINITE_PENALTY, torch.tensor(True), 7 if ctx.rank == 1 else 9)
    agreement.raise_if(Flag.NONFINITE_PENALTY, torch.tensor(True), 12)  # a later step does not replace the first
    agreement.raise_if(Flag.DATA_ERROR, torch.tensor(False), 3)  # a false condition raises nothing
    after = agreement.check()
    start = time.perf_counter()
    for _ in range(20):
        agreement.check()
    return {
        "before": {int(k): v for k, v in before.items()},
        "after": {int(k): v for k, v in after.items()},
        "check_ms": (time.perf_counter() - start) / 20 * 1e3,
    }


@check
def float64_all_reduce_is_exact(ctx: Context) -> dict:
    """Sum of per-rank float64 values over gloo equals the sum computed locally from every rank's value."""
    values = torch.arange(5, dtype=torch.float64) / 3 + ctx.rank * 1e-13
    summed = values.clone()
    torch.distributed.all_reduce(summed)
    expected = sum(torch.arange(5, dtype=torch.float64) / 3 + r * 1e-13 for r in range(ctx.world_size))
    return {"max_abs_diff": (summed - expected).abs().max().item()}


@check
def train_stream_ranks_equal_and_disjoint(ctx: Context) -> dict:
    """Uneven shards read by real processes: equal batch counts, disjoint samples, every sample accounted for."""
    root = ctx.shared_dir / "uneven_shards"
    sizes = [100, 100, 100, 37, 3]
    if ctx.rank == 0:
        n = sum(sizes)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        start = 0
        for i, size in enumerate(sizes):  # one directory per shard, joined below as '::' sources
            write_shards(ArraySource(images[start : start + size]), root / f"part{i}", prefix=f"s{i}")
            start += size
    ctx.accelerator.wait_for_everyone()
    index = read_index("::".join(str(root / f"part{i}") for i in range(len(sizes))))
    stream = TrainStream(
        index,
        (1, 28, 28),
        batch_size=16,
        seed=3,
        rank=ctx.rank,
        world_size=ctx.world_size,
        num_workers=1,
        shuffle_buffer=50,
    )
    ids = [int(x[i, 0, 0, 0]) + 256 * int(x[i, 0, 0, 1]) for x, _, _ in stream.epoch(0) for i in range(len(x))]
    order = stream.order(0)
    return {"ids": ids, "batches": order.steps, "dropped": order.dropped, "total": sum(sizes)}
