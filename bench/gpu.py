"""The bf16 training step on one GPU against the card's peak, and the loader against the step.

    python bench/gpu.py                      # a few minutes on one GPU
    python bench/gpu.py --quick              # a smoke run of this script on any machine (tiny, CPU if no GPU)

For pythae's MNIST conv pair, the WAE paper's CelebA conv network and the 64x64 residual network of
`configs/celeba64/wae_mmd_resnet.yaml` (171M parameters), in bf16 (autocast, and with the bf16 weights copy kept
between steps, `train.low_precision_weights`), at the recipes' batch of 100 and at a larger one: the FLOPs of one
training step (forward and backward, counted by torch's FlopCounterMode; the optimizer and elementwise work are
not counted, as for MFU), its time (the best of three rounds, each waited for at its end), and the model FLOP
utilisation against the card's dense bf16 peak from its data sheet (`--peak-tflops` for a card the table does not
know) and against the bf16 matmul peak measured in the same run. Then the loader's samples/s (one process; the
real MNIST shards where `make data` wrote them, else synthetic 28x28 images; synthetic 64x64 RGB images as PNG,
what `vegan-scale shards folder` writes, and as npy) with 1, 4 and 8 workers, against each case's samples/s: the
loader keeps up where it delivers at least what the step consumes. The last line is the 64x64 residual network's
utilisation and the workers its loader needs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from flops import matmul_peak, step_flops  # noqa: E402
from loader import MNIST, loader_rate, smooth_images  # noqa: E402
from step_under_test import training_step  # noqa: E402

from vegan_scale.data.images import load_images  # noqa: E402
from vegan_scale.data.index import read_index  # noqa: E402
from vegan_scale.data.sources import ArraySource  # noqa: E402
from vegan_scale.data.write import write_shards  # noqa: E402

# Dense bf16 tensor-core TFLOP/s (no sparsity) from the vendors' data sheets; the first name the device's contains.
SHEET_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0))
BF16 = ["train.mixed_precision=bf16"]
COPY = [*BF16, "train.low_precision_weights=true"]
LAST = ["train.channels_last=true"]


@dataclass(frozen=True)
class Case:
    label: str
    config: str
    network: str
    overrides: list[str]
    batch: int
    data: str  # the loader's data set it is compared with

    @property
    def name(self) -> str:
        return f"{self.label}, batch {self.batch}"


CASES = [
    Case("conv pair, bf16", "configs/mnist/wae_mmd.yaml", "pythae_conv", [*BF16, *LAST], 100, "28x28 npy"),
    Case("conv pair, bf16 copy", "configs/mnist/wae_mmd.yaml", "pythae_conv", COPY, 100, "28x28 npy"),
    Case("conv pair, bf16", "configs/mnist/wae_mmd.yaml", "pythae_conv", [*BF16, *LAST], 1000, "28x28 npy"),
    Case("CelebA conv, bf16", "configs/celeba64/wae_mmd.yaml", "conv", [*BF16, *LAST], 100, "64x64 png"),
    Case("resnet 64x64, bf16", "configs/celeba64/wae_mmd_resnet.yaml", "resnet", [*BF16, *LAST], 100, "64x64 png"),
    Case("resnet 64x64, bf16 copy", "configs/celeba64/wae_mmd_resnet.yaml", "resnet", COPY, 100, "64x64 png"),
    Case("resnet 64x64, bf16", "configs/celeba64/wae_mmd_resnet.yaml", "resnet", [*BF16, *LAST], 256, "64x64 png"),
]
QUICK = ["model.resnet.width=8", "model.conv.width=8"]  # --quick: networks small enough for a CPU


def card_peak(device: torch.device, given: float | None) -> tuple[str, float | None]:
    """The device's name and its data-sheet dense bf16 FLOP/s (``given`` in TFLOP/s first; None if unknown)."""
    if device.type != "cuda":
        return "CPU", given and given * 1e12
    name = torch.cuda.get_device_name(device)
    if given:
        return name, given * 1e12
    return name, next((tflops * 1e12 for part, tflops in SHEET_TFLOPS if part in name), None)


def step_seconds(step: object, steps: int, rounds: int = 3) -> float:
    """Seconds per step: the best of ``rounds`` runs of ``steps`` steps, each run waited for at its end (the step
    returns its loss; reading it waits for the device)."""
    for _ in range(5):
        step()
    best = float("inf")
    for _ in range(rounds):
        step().item()
        start = time.perf_counter()
        for _ in range(steps):
            loss = step()
        loss.item()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def image_sets(tmp: Path, samples: int) -> dict[str, tuple[Path, tuple[int, int, int]]]:
    """The loader's data sets: shard directories and their image shape."""
    sets = {}
    if MNIST.exists():
        sets["28x28 npy"] = (MNIST, (1, 28, 28))
    else:
        grey = tmp / "28x28_npy"
        write_shards(ArraySource(smooth_images(samples, 28, 1)), grey, prefix="g", samples_per_shard=samples // 4)
        sets["28x28 npy"] = (grey, (1, 28, 28))
    rgb = smooth_images(samples, 64, 3, seed=1)
    for fmt in ("png", "npy"):
        out = tmp / f"64x64_{fmt}"
        write_shards(ArraySource(rgb), out, prefix="c", fmt=fmt, samples_per_shard=samples // 4)
        sets[f"64x64 {fmt}"] = (out, (3, 64, 64))
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--samples", type=int, default=20000, help="synthetic images per data set")
    parser.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if the table lacks it")
    parser.add_argument("--quick", action="store_true", help="tiny networks and runs: checks the script, not a card")
    args = parser.parse_args()
    cases, workers = CASES, (1, 4, 8)
    if args.quick:
        args.steps, args.samples, workers = 2, 400, (0, 1)
        cases = [Case(c.label, c.config, c.network, [*c.overrides, *QUICK], 8, c.data) for c in CASES[::3]]
    elif not torch.cuda.is_available():
        sys.exit("no CUDA device: this benchmark measures a GPU (bench/flops.py measures a CPU); --quick checks it")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name, sheet = card_peak(device, args.peak_tflops)
    measured = matmul_peak(torch.bfloat16, n=256 if args.quick else 8192, device=device.type)
    rows, loaders = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        sets = image_sets(Path(tmp), args.samples)
        for data, (directory, shape) in sets.items():
            index = read_index(str(directory))
            loaders[data] = {w: loader_rate(index, shape, w, args.samples // 100) for w in workers}
        for case in cases:
            directory, shape = sets[case.data]
            images = Path(tmp) / f"{case.data.replace(' ', '_')}.npy"
            if not images.exists():
                np.save(images, load_images(read_index(str(directory)), shape, 2000)[0].numpy())
            step = training_step(case.network, case.overrides, images, case.config, case.batch)
            flops = step_flops(step)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds = step_seconds(step, args.steps)
            memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            rows.append((case, flops, seconds, memory))
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"device: {name}; bf16 matmul peak measured {measured / 1e12:.1f} TFLOP/s", end="")
    print(f", data sheet {sheet / 1e12:.1f} TFLOP/s" if sheet else ", data sheet unknown (--peak-tflops)")
    columns = f"{'GFLOP/step':>10} {'ms/step':>8} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'of meas.':>8}"
    print(f"{'case':<34} {columns} {'peak GiB':>8}  loader workers to keep up")
    for case, flops, seconds, memory in rows:
        rate, consumed = flops / seconds, case.batch / seconds
        enough = [w for w, supplied in loaders[case.data].items() if supplied >= consumed]
        keeps = f"{min(enough)} ({case.data})" if enough else f"more than {max(workers)} ({case.data})"
        mfu = f"{100 * rate / sheet:5.1f}%" if sheet else "   n/a"
        print(
            f"{case.name:<34} {flops / 1e9:>10.1f} {1e3 * seconds:>8.2f} {consumed:>10.0f} {rate / 1e12:>8.2f} "
            f"{mfu} {100 * rate / measured:>7.1f}% {memory:>8.2f}  {keeps}"
        )
    for data, rates in loaders.items():
        print(f"loader {data}: " + ", ".join(f"{w} worker(s) {r:.0f} samples/s" for w, r in rates.items()))
    case, flops, seconds, _ = max((r for r in rows if r[0].network == "resnet"), key=lambda r: r[1] / r[2])
    mfu = f"{100 * flops / seconds / sheet:.1f}% of the data-sheet peak" if sheet else "data-sheet peak unknown"
    enough = [w for w, supplied in loaders[case.data].items() if supplied >= case.batch / seconds]
    needs = f"{min(enough)} loader worker(s) keep up" if enough else f"{max(workers)} loader workers do not keep up"
    print(f"headline: {case.name} at {mfu} ({100 * flops / seconds / measured:.1f}% of the measured); {needs}")


if __name__ == "__main__":
    main()
