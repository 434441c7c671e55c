"""How much of the machine a training step uses: achieved FLOP/s over the measured matmul peak, same precision.

    .venv/bin/python bench/flops.py          # about 5 minutes on 2 cores

In one run: the matmul peak of this CPU in float32 and bf16 (2048 x 2048 products, all cores; the faster of a
measurement before the cases and one after), then, for pythae's MNIST conv pair (`pythae_conv`, 17M parameters)
and the MLP pair, the FLOPs of one full training step (forward and backward, counted by torch's FlopCounterMode;
the optimizer and elementwise work are not counted, as usual for MFU) and its median time, giving the
utilisation, in float32, bf16 autocast and bf16 with the weights copy kept between steps
(``train.low_precision_weights``). A per-operator profile (self time) shows where each step's time goes. The last
lines hold the utilisations that have targets against them.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from step_under_test import training_step  # noqa: E402

from vegan_scale.data.images import load_images  # noqa: E402
from vegan_scale.data.index import read_index  # noqa: E402
from vegan_scale.distributed.accelerator import bf16_emulated  # noqa: E402

COPY = ["train.mixed_precision=bf16", "train.low_precision_weights=true"]  # bf16 weights kept between steps
CASES = [  # (label, network, overrides, timed steps)
    ("conv pair, float32", "pythae_conv", ["train.channels_last=true"], 6),
    ("conv pair, bf16", "pythae_conv", ["train.mixed_precision=bf16", "train.channels_last=true"], 10),
    ("conv pair, bf16 copy", "pythae_conv", COPY, 10),  # channels-last would add layout copies back
    ("MLP pair, float32", "mlp", [], 100),
    ("MLP pair, bf16", "mlp", ["train.mixed_precision=bf16"], 100),
    ("MLP pair, bf16 copy", "mlp", COPY, 100),
]
TARGETS = [  # (case, target share of its precision's peak)
    ("conv pair, float32", 0.75),
    ("conv pair, bf16 copy", 0.72),
    ("MLP pair, float32", 0.55),
]


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 40, device: str = "cpu") -> float:
    """FLOP/s of the fastest of ``reps`` n x n products (on a GPU, each waited for). A shared host's rate swings
    between calls (an AMX host's bf16 product from 0.8 to 2 TFLOP/s within a second): the fastest of many is its
    peak."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    wait = torch.cuda.synchronize if a.is_cuda else lambda: None
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        wait()
        start = time.perf_counter()
        a @ b
        wait()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def machine_peaks() -> dict[str, float]:
    """The matmul peak of each precision the cases run in, by their labels' names."""
    return {"float32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}


def step_flops(step: object) -> int:
    """The FLOPs of one step after the first: at its first call each CPU convolution times its two forms
    (vegan_scale.models.layers), trial products the counter would add to the model's (8.6x on the conv pair)."""
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def step_time(step: object, steps: int) -> float:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step().item()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_convolution", "aten::mkldnn_convolution",
            "aten::convolution_backward")  # fmt: skip


def top_ops(step: object, rows: int = 8) -> tuple[str, float]:
    """The profile's table of 3 steps, and the seconds per step spent in the matrix products and convolutions
    themselves (their self time): the step's time if everything else cost nothing."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    events = prof.key_averages()
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / 1e6 / 3
    return events.table(sort_by="self_cpu_time_total", row_limit=rows), products


def main() -> None:
    before = machine_peaks()
    results, profiles = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npy"
        np.save(images, load_images(read_index(str(ROOT / ".data/shards/mnist/train")), (1, 28, 28), 2000)[0].numpy())
        for label, network, overrides, steps in CASES:
            step = training_step(network, overrides, images)
            flops, seconds = step_flops(step), step_time(step, steps)
            profiles[label], products = top_ops(step)
            results.append((label, flops, seconds, products))
    # Measured again after the cases: a host's slow stretch at the first measurement put the bf16 peak at 402
    # GFLOP/s against 660-810 in the runs around it, and a step at "107% of peak".
    after = machine_peaks()
    peaks = {precision: max(before[precision], after[precision]) for precision in before}
    print(
        f"matmul peak: float32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s "
        f"({torch.get_num_threads()} threads; the faster of before the cases, "
        f"{before['float32'] / 1e9:.0f} and {before['bf16'] / 1e9:.0f}, and after)"
    )
    for label, table in profiles.items():
        print(f"\nwhere the time goes, {label} (3 steps):\n{table}")
    header = f"{'case':<20} {'GFLOP/step':>10} {'ms/step':>9} {'samples/s':>10} {'GFLOP/s':>8} {'of peak':>8}"
    print(f"{header} {'bound':>6}")
    shares = {}
    for label, flops, seconds, products in results:
        peak = peaks["bf16" if "bf16" in label else "float32"]
        shares[label] = flops / seconds / peak
        print(
            f"{label:<20} {flops / 1e9:>10.2f} {1e3 * seconds:>9.1f} {100 / seconds:>10.0f} "
            f"{flops / seconds / 1e9:>8.1f} {100 * shares[label]:>7.0f}% {100 * flops / products / peak:>5.0f}%"
        )
    print("bound: the share of peak if the step were its products alone (their profiled self time), nothing else")
    emulated = bf16_emulated(cuda=False)
    for label, target in TARGETS:
        met = "met" if shares[label] >= target else "NOT met"
        if emulated and "bf16" in label:  # a share of an emulated peak says nothing about the kernels
            met = "does not apply: this CPU has no bf16 instructions (AVX-512 BF16 or AMX), bf16 is emulated"
        print(f"target: {label} at {100 * shares[label]:.0f}% of its matmul peak (target {100 * target:.0f}%): {met}")


if __name__ == "__main__":
    main()
