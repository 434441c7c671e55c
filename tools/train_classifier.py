"""Train the LeNet feature network of the evaluation metrics on one data set's shards and save it as safetensors.

    .venv/bin/python tools/train_classifier.py mnist            # about 3 minutes on 2 CPU cores
    .venv/bin/python tools/train_classifier.py fashion_mnist

Fixed seed, CPU, deterministic algorithms: the same shards give the same file. The result is written to
vegan_scale/evaluation/weights/<name>.safetensors (package data), with the test accuracy in its metadata.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from vegan_scale.data.images import load_images
from vegan_scale.data.index import read_index
from vegan_scale.evaluation.classifier import CLASSIFIERS, IMAGE_SHAPE, WEIGHTS_DIR, LeNet

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = {"mnist": 3, "fashion_mnist": 5}


def split(shards: Path, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split as floats in [0, 1], and their labels."""
    images, labels = load_images(read_index(str(shards / name)), IMAGE_SHAPE, limit=10**9)
    return images.float() / 255, labels


@torch.no_grad()
def accuracy(model: LeNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predicted = torch.cat([model(x).argmax(dim=1) for x in images.split(1000)])
    return (predicted == labels).double().mean().item()


def train(model: LeNet, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int, seed: int) -> None:
    """Adam with a cosine learning rate, shuffled by a seeded generator."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps, step = epochs * (len(images) // batch), 0
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        start, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(images), generator=order).split(batch):
            if len(idx) < batch:
                continue
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, step = total + loss.item(), step + 1
        print(
            f"epoch {epoch + 1}/{epochs}: loss {total / (len(images) // batch):.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", choices=CLASSIFIERS)
    p.add_argument("--shards", type=Path, help="shard directory with train/ and test/ (default .data/shards/<name>)")
    p.add_argument("--epochs", type=int, help="passes over the training set (default: 3 MNIST, 5 Fashion-MNIST)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="weight file (default: the package's weights/<name>.safetensors)")
    args = p.parse_args()
    shards = args.shards or ROOT / ".data" / "shards" / args.dataset
    epochs = args.epochs or EPOCHS[args.dataset]
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    model = LeNet()
    train(model, *split(shards, "train"), epochs, args.batch, args.seed)
    acc = accuracy(model, *split(shards, "test"))
    out = args.out or WEIGHTS_DIR / f"{args.dataset}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"dataset": args.dataset, "test_accuracy": f"{acc:.4f}", "epochs": str(epochs), "seed": str(args.seed)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out, metadata=metadata)
    print(f"test accuracy {acc:.4f}; wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
