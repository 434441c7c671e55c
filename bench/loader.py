"""Loader throughput against what training consumes, measured in one run on this machine.

    .venv/bin/python bench/loader.py            # about 3 minutes on 2 cores

For 28x28 grey and 64x64 RGB shards in each storage format, the loader's samples/s with 0, 1 and 2 worker
processes; then the samples/s one training process consumes at the default MNIST configs and the CelebA 64x64
config (forward, backward and optimizer step on in-memory batches, after warm-up). The table ends with the ratio
of 1-worker loader throughput to training consumption; the last line is the smallest such ratio (target: >= 5).
Then the read amplification of the training order (docs/design.md, Data order): bytes read from the shards over
bytes of the samples trained on, all ranks of 1, 2 and 4 processes added (each simulated in turn, reads counted by
the kernel's rchar), with each shard's .idx (entering a shard at the first sample wanted) and without it (passing
over the samples before it). 1.0 is every byte read once. And the loader's samples/s at rank 0 of 1, 2 and 4
processes against the previous design's (the stream of commit 9959fca, loaded from git history), same shards.
First, tar parsing alone: one real MNIST shard's members grouped into samples with their bytes read, by Python's
`tarfile` and by vegan_scale's header parser (`vegan_scale.data.shardio`), best of 3 reads each from the page cache
(no decoding, no batching), and their ratio.
28x28 shards are the real MNIST shards when `make data` has written them; 64x64 images are synthetic (smooth
random fields: no photographs ship offline), which decode like photographs of that size.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vegan_scale.costs import reconstruction_cost
from vegan_scale.data.index import ShardIndex, read_index
from vegan_scale.data.pipeline import TrainStream
from vegan_scale.data.shardio import iter_tar_samples, split_name
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards
from vegan_scale.engine.objective import pot_objective
from vegan_scale.experiment import load_experiment
from vegan_scale.registry import build_model, build_penalty, build_prior

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT / ".data" / "shards" / "mnist" / "train"
PREVIOUS = "9959fca"  # the last commit with the previous training stream


def smooth_images(n: int, side: int, channels: int, seed: int = 0) -> np.ndarray:
    """Random images with photograph-like spatial correlation: 8x8 noise upsampled with bicubic filtering."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(n, 8, 8, channels), dtype=np.uint8)
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((n, side, side, channels), dtype=np.uint8)
    for i in range(n):
        img = Image.fromarray(small[i, ..., 0] if channels == 1 else small[i], mode)
        out[i] = np.asarray(img.resize((side, side), Image.Resampling.BICUBIC)).reshape(side, side, channels)
    return out[..., 0] if channels == 1 else out


def tarfile_samples(path: Path) -> int:
    """Samples of a shard as Python's tarfile reads them (members grouped by key, bytes read)."""
    keys, samples = None, 0
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                tar.extractfile(member).read()
                key = split_name(member.name)[0]
                samples, keys = samples + (key != keys), key
    return samples


def shardio_samples(path: Path) -> int:
    with open(path, "rb") as stream:
        return sum(1 for _ in iter_tar_samples(stream, str(path)))


def parsing_rate(read: Callable[[Path], int], path: Path, repeats: int = 3) -> float:
    """Samples/s of ``read`` over one shard, the best of ``repeats`` (the first read also warms the page cache)."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = read(path)
        best = max(best, n / (time.perf_counter() - start))
    return best


def loader_rate(
    index: ShardIndex,
    shape: tuple[int, int, int],
    workers: int,
    max_batches: int,
    world: int = 1,
    stream_class: type = TrainStream,
) -> float:
    """Samples/s of rank 0 of ``world`` (a global batch of 100), after its first batch."""
    stream = stream_class(
        index, shape, batch_size=100 // world, seed=0, world_size=world, num_workers=workers, shuffle_buffer=1000
    )
    batches = min(max_batches, stream.batches_per_epoch)
    it = stream.epoch(0)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    n = sum(len(images) for images, _, _ in (next(it) for _ in range(batches - 1)))
    return n / (time.perf_counter() - start)


def previous_design() -> type | None:
    """The training stream before the topology-independent order (readers with disjoint shard ranges and a shuffle
    buffer each), from this repository's history, as the same-run baseline; None outside a git checkout."""
    try:
        source = subprocess.run(
            ["git", "show", f"{PREVIOUS}:vegan_scale/data/pipeline.py"], cwd=ROOT, capture_output=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("previous_pipeline")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{PREVIOUS}:vegan_scale/data/pipeline.py", "exec"), module.__dict__)
    return module.TrainStream


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (the kernel's count)."""
    with open("/proc/self/io") as io:
        return int(next(line for line in io if line.startswith("rchar")).split()[1])


def read_amplification(directory: Path, shape: tuple[int, int, int], world: int) -> float:
    """Bytes read by every rank of ``world`` over one epoch, over the bytes of the samples they train on."""
    index = read_index(str(directory))
    read = 0
    for rank in range(world):
        stream = TrainStream(index, shape, 100 // world, seed=0, rank=rank, world_size=world, shuffle_buffer=1000)
        before = _bytes_read()
        for _ in stream.epoch(0):
            pass
        read += _bytes_read() - before
    order = stream.order(0)
    shard_bytes = sum(Path(url).stat().st_size for url in index.urls)
    return read / (shard_bytes * order.steps * order.global_batch / order.samples)


def train_rate(config: str, overrides: list[str], steps: int) -> float:
    cfg = load_experiment(ROOT / config, overrides)
    torch.manual_seed(0)
    model, penalty, prior = build_model(cfg), build_penalty(cfg), build_prior(cfg)
    params = list(model.parameters()) + (list(penalty.critic.parameters()) if penalty.critic else [])
    optimizer = torch.optim.Adam(params, lr=cfg.optim.lr)
    x = torch.rand(cfg.train.global_batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)

    def step() -> None:
        terms = pot_objective(model, prior, partial(reconstruction_cost, kind="l2sq"), penalty, cfg.penalty.weight, x)
        terms.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=6000, help="synthetic samples per shard set")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per config")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows: list[tuple[str, str, float]] = []
    ratios = []
    if MNIST.exists():
        shard = sorted(MNIST.glob("*.tar"))[0]
        parsed = {
            name: parsing_rate(read, shard)
            for name, read in (("tarfile", tarfile_samples), ("shardio", shardio_samples))
        }
        rows += [(f"tar parsing, {name}", "1 process", rate) for name, rate in parsed.items()]
        ratios.append(("tar parsing: shardio / tarfile", parsed["shardio"] / parsed["tarfile"]))
    with tempfile.TemporaryDirectory() as tmp:
        sets: dict[str, tuple[ShardIndex, tuple[int, int, int]]] = {}
        grey = smooth_images(args.samples, 28, 1)
        rgb = smooth_images(args.samples, 64, 3, seed=1)
        for name, images, fmt, shape in [
            ("28x28 npy", grey, "npy", (1, 28, 28)),
            ("28x28 png", grey, "png", (1, 28, 28)),
            ("64x64 npy", rgb, "npy", (3, 64, 64)),
            ("64x64 png", rgb, "png", (3, 64, 64)),
            ("64x64 jpg", rgb, "jpg", (3, 64, 64)),
        ]:
            out = Path(tmp) / name.replace(" ", "_")
            write_shards(ArraySource(images), out, prefix="b", fmt=fmt, samples_per_shard=args.samples // 4)
            sets[name] = (read_index(str(out)), shape)
        if MNIST.exists():
            sets["28x28 npy"] = (read_index(str(MNIST)), (1, 28, 28))  # the real data, as training reads it
        without = Path(tmp) / "28x28_npy_no_idx"
        shutil.copytree(Path(tmp) / "28x28_npy", without, ignore=shutil.ignore_patterns("*.idx"))
        for world in (1, 2, 4):
            for name, directory in (("with .idx", Path(tmp) / "28x28_npy"), ("without .idx", without)):
                amplification = read_amplification(directory, (1, 28, 28), world)
                ratios.append((f"read amplification, {world} process(es), {name}", amplification))
        previous = previous_design()
        if previous is not None:  # the same shards, rank 0 of 1, 2 and 4 processes, 1 loader worker each
            index = read_index(str(Path(tmp) / "28x28_npy"))
            for world in (1, 2, 4):
                now, before = (
                    loader_rate(index, (1, 28, 28), 1, args.samples // 100, world, design)
                    for design in (TrainStream, previous)
                )
                what = f"loader throughput, rank 0 of {world}, 1 worker: this design / {PREVIOUS}"
                ratios.append((what, now / before))
        max_batches = args.samples // 100
        for name, (index, shape) in sets.items():
            for workers in (0, 1, 2):
                rows.append((f"loader {name}", f"{workers} worker(s)", loader_rate(index, shape, workers, max_batches)))
    consumers = [
        ("configs/mnist/quickstart.yaml", [], "28x28 npy"),
        ("configs/mnist/wae_mmd.yaml", [], "28x28 npy"),
        ("configs/celeba64/wae_mmd.yaml", [], "64x64 png"),
    ]
    loader_ratios = []
    for config, overrides, data in consumers:
        consumed = train_rate(config, overrides, args.steps)
        supplied = next(r for n, w, r in rows if n == f"loader {data}" and w == "1 worker(s)")
        rows.append((f"train {config}", "1 process", consumed))
        loader_ratios.append((f"{data} loader (1 worker) / {config}", supplied / consumed))
    print(f"{'what':<42} {'setting':<12} {'samples/s':>10}")
    for what, setting, rate in rows:
        print(f"{what:<42} {setting:<12} {rate:>10.0f}")
    for what, ratio in ratios + loader_ratios:
        print(f"ratio {what}: {ratio:.2f}x")
    worst = min(r for _, r in loader_ratios)
    print(f"headline: the 1-worker loader supplies {worst:.1f}x what training consumes (worst case)")


if __name__ == "__main__":
    main()
