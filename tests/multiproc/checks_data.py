"""Multi-process checks of the data pipeline: two real processes with loader workers, and DDP training on bad data.

Rank 0 writes the shards (hand-built with tarfile) into the shared directory; every check then reads them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from tests.multiproc.harness import Context, check
from tests.shardkit import header_offsets, ids_of, make_shards, read_only_by, set_header_field
from vegan_scale.data.index import read_index
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.errors import DataError

UNEVEN = [100, 100, 100, 37, 8]  # 345 samples: 17 batches of 10 per rank, 5 dropped


def _uneven_index(ctx: Context):
    root = ctx.shared_dir / "data_uneven"
    if ctx.rank == 0 and not (root / "sizes.json").exists():
        make_shards(root, UNEVEN)
    ctx.accelerator.wait_for_everyone()
    return read_index(str(root))


def _stream(ctx: Context, mode: str, world_size: int | None = None, num_workers: int = 2) -> TrainStream:
    """This rank's stream; with ``world_size=1``, the whole global batch (of 20) in this process (called on one
    rank only after a call on every rank: the index is made by the first, with a barrier)."""
    world_size = world_size or ctx.world_size
    return TrainStream(
        _uneven_index(ctx) if world_size > 1 else read_index(str(ctx.shared_dir / "data_uneven")),
        (1, 8, 8),
        batch_size=20 // world_size,
        seed=5,
        rank=ctx.rank if world_size > 1 else 0,
        world_size=world_size,
        num_workers=num_workers,
        shuffle_buffer=30,
        mode=mode,
    )


def _read(ctx: Context, mode: str) -> dict:
    stream = _stream(ctx, mode)
    batches = list(stream.epoch(0))
    order = stream.order(0)
    one_process = _stream(ctx, mode, world_size=1, num_workers=0).epoch(0) if ctx.rank == 0 else []
    return {
        "one_process_ids": [ids_of(images) for images, _, _ in one_process],
        "batch_ids": [ids_of(images) for images, _, _ in batches],
        "labels_ok": all(labels.tolist() == [i % 10 for i in ids_of(images)] for images, labels, _ in batches),
        "batches": order.steps,
        "dropped": order.dropped,
        "total": sum(UNEVEN),
    }


@check
def data_epoch_two_ranks_two_workers(ctx: Context) -> dict:
    """Epoch mode, 2 processes x 2 loader workers, uneven shards: each rank's batches with their sample ids."""
    return _read(ctx, "epoch")


@check
def data_resampled_two_ranks_two_workers(ctx: Context) -> dict:
    """Resampled mode, same layout: each rank's batches."""
    return _read(ctx, "resampled")


@check
def data_resume_per_rank(ctx: Context) -> dict:
    """Per rank and mode: does epoch(1, start=j) equal epoch(1)[j:] exactly? (17 batches, 2 workers)."""
    result = {}
    for mode in ("epoch", "resampled"):
        stream = _stream(ctx, mode)
        full = list(stream.epoch(1))
        for start in (1, 2, 5, 16):
            resumed = list(stream.epoch(1, start=start))
            result[f"{mode}/{start}"] = len(resumed) == len(full) - start and all(
                torch.equal(x, y) for a, b in zip(full[start:], resumed, strict=True) for x, y in zip(a, b, strict=True)
            )
    return result


# --- DDP training with one undecodable image that only rank 1 reads ---


def _training_data(ctx: Context, name: str, damage: str = "image") -> tuple[Path, Path, str]:
    """(train dir, test dir, the poisoned shard's name): 8 shards of 25 grey 28x28 images; in the first shard
    that rank 1 alone reads in epoch 0 (global batch 20, seed 0, no loader workers), one image is undecodable
    (``damage="image"``) or the tar header of sample 7's image gives a size far beyond the file (``"header"``)."""
    root = ctx.shared_dir / name
    train, test = root / "train", root / "test"
    info = root / "poisoned.json"
    if ctx.rank == 0:
        make_shards(train, [25] * 8, side=28)
        make_shards(test, [20, 20], side=28)
        url = read_only_by(read_index(str(train)), 20, 2, 1)[0]  # epoch 0 is one block (200 samples, L = 100)
        shard = int(Path(url).stem.rsplit("-", 1)[1])
        bad = 25 * shard + 7
        if damage == "image":
            make_shards(
                train,
                [25] * 8,
                side=28,
                replace={bad: [(f"{bad:08d}.npy", b"\x93NUMPY\x01\x00not an array"), (f"{bad:08d}.cls", b"1")]},
            )
        else:
            raw = bytearray(Path(url).read_bytes())
            set_header_field(raw, header_offsets(bytes(raw))[2 * 7], 124, b"\x80" + (10**12).to_bytes(11, "big"))
            Path(url).write_bytes(bytes(raw))
        info.write_text(json.dumps(Path(url).name))
    ctx.accelerator.wait_for_everyone()
    return train, test, json.loads(info.read_text())


def _train(ctx: Context, on_error: str, damage: str = "image") -> dict:
    """Train with data.on_error=on_error; returns the run directory or the error, the time taken, the shard."""
    from vegan_scale.engine.loop import train
    from vegan_scale.experiment import load_experiment

    train_dir, test_dir, poisoned = _training_data(ctx, f"data_train_{on_error}_{damage}", damage)
    root = ctx.shared_dir / "runs"
    cfg = load_experiment(
        None,
        [
            "model.network=mlp",
            "model.mlp.hidden=[16]",
            "train.global_batch_size=20",
            "train.max_steps=10",  # one epoch: rank 1 reads every sample of its range
            "train.check_every=2",
            "data.num_workers=0",
            "tracking.backend=none",
            "checkpoint.every_steps=0",
            "eval.num_samples=20",
            "eval.grid_size=2",
            f"run.root={root}",
            f"run.name=on_error_{on_error}_{damage}",
            f"data.train={train_dir}",
            f"data.test={test_dir}",
            f"data.on_error={on_error}",
        ],
    )
    out = {"poisoned": poisoned, "run_dir": root / cfg.run.experiment / cfg.run.name, "error": None}
    start = time.perf_counter()
    try:  # train() leaves the process group alive, so the harness's next barrier and a second train() work
        train(cfg)
    except Exception as e:
        out["error"] = e
    out["seconds"] = time.perf_counter() - start
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _raised(ctx: Context, damage: str) -> dict:
    out = _train(ctx, "raise", damage)
    error = out["error"]
    result = {
        "type": type(error).__name__ if error else None,
        "is_data_error": isinstance(error, DataError),
        "message": str(error),
        "seconds": out["seconds"],
        "poisoned": out["poisoned"],
    }
    if ctx.rank == 0:
        result["exit"] = json.loads((out["run_dir"] / "exit_status.json").read_text())["code"]
    return result


def _skipped(ctx: Context, damage: str, reason: str) -> dict:
    out = _train(ctx, "skip", damage)
    result = {"error": repr(out["error"]) if out["error"] else None, "seconds": out["seconds"]}
    if ctx.rank == 0:
        lines = _metrics(out["run_dir"])
        result["skipped"] = sum(m.get(f"data/skipped/{reason}", 0) for m in lines)
        result["skip_keys"] = sorted({k for m in lines for k in m if k.startswith("data/skipped/")})
        result["last_step"] = max(m["step"] for m in lines)
        result["exit"] = json.loads((out["run_dir"] / "exit_status.json").read_text())["code"]
    return result


@check
def data_train_on_error_raise(ctx: Context) -> dict:
    """DDP training where rank 1 meets an undecodable image: both ranks stop with the same DataError."""
    return _raised(ctx, "image")


@check
def data_train_on_error_skip(ctx: Context) -> dict:
    """The same with data.on_error=skip: both ranks finish; the main process's metrics count the skipped image."""
    return _skipped(ctx, "image", "undecodable_image")


@check
def data_train_damaged_header_raise(ctx: Context) -> dict:
    """DDP training where rank 1 meets a tar header whose size runs past the file: both ranks stop, shard named."""
    return _raised(ctx, "header")


@check
def data_train_damaged_header_skip(ctx: Context) -> dict:
    """The same with data.on_error=skip: both ranks finish, the rest of that shard counted as corrupt_shard."""
    return _skipped(ctx, "header", "corrupt_shard")
