"""The memory allocator under a CPU training step: glibc's malloc against tcmalloc preloaded (``launch/run.sh``'s
default on CPU where the library is installed).

    .venv/bin/python bench/allocator.py          # about 6 minutes on 2 cores; needs libtcmalloc-minimal4

glibc's malloc hands every allocation of 32 MB or more (pythae's conv pair has a 34 MB weight gradient) to a
fresh ``mmap`` and returns it to the kernel when freed, and gives back the top of its heap past a threshold, so
each step touches new pages: thousands to tens of thousands of page faults a step, paid in kernel time and cold
caches. tcmalloc keeps freed memory for
the next step. Each case runs the engine's step (bench/step_under_test.py) in a process of its own, glibc and
tcmalloc alternating for ``--rounds`` rounds; a process prints its median step and its minor page faults a step.
The ratio is glibc's median step over tcmalloc's, the median over rounds (above 1: tcmalloc is faster).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # label -> (network, overrides, timed steps)
    "conv pair, float32": ("pythae_conv", ["train.channels_last=true"], 6),
    "conv pair, bf16 copy": ("pythae_conv", ["train.mixed_precision=bf16", "train.low_precision_weights=true"], 10),
    "MLP pair, float32": ("mlp", [], 300),
}
LIBRARY = "tcmalloc_minimal"


def child(label: str, images: Path) -> None:
    """Time ``label``'s step in this process; print one JSON line."""
    sys.path.insert(0, str(ROOT / "bench"))
    from step_under_test import training_step

    network, overrides, steps = CASES[label]
    step = training_step(network, overrides, images)
    for _ in range(3):
        step()
    before, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        start = time.perf_counter()
        step().item()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "ms": 1e3 * statistics.median(times),
                "faults": (after.ru_minflt - before.ru_minflt) / steps,
                "system_ms": 1e3 * (after.ru_stime - before.ru_stime) / steps,
            }
        )
    )


def measure(label: str, images: Path, preload: str | None) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | ({"LD_PRELOAD": preload} if preload else {})
    done = subprocess.run(
        [sys.executable, __file__, "--child", label, "--images", str(images)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images)
        return
    tcmalloc = ctypes.util.find_library(LIBRARY)
    if tcmalloc is None:
        sys.exit(f"lib{LIBRARY}.so is not installed: `apt-get install libtcmalloc-minimal4` (Debian, Ubuntu)")
    import numpy as np

    from vegan_scale.data.images import load_images
    from vegan_scale.data.index import read_index

    print(f"{'case':<22} {'allocator':<10} {'ms/step':>16} {'faults/step':>12} {'kernel ms/step':>15}")
    ratios = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npy"
        np.save(images, load_images(read_index(str(ROOT / ".data/shards/mnist/train")), (1, 28, 28), 2000)[0].numpy())
        for label in CASES:
            runs: dict[str, list[dict[str, float]]] = {"glibc": [], "tcmalloc": []}
            for _ in range(args.rounds):
                runs["glibc"].append(measure(label, images, None))
                runs["tcmalloc"].append(measure(label, images, tcmalloc))
            for name, rows in runs.items():
                ms = sorted(r["ms"] for r in rows)
                faults, kernel = (statistics.median(r[k] for r in rows) for k in ("faults", "system_ms"))
                spread = f"{statistics.median(ms):.1f} ({ms[0]:.0f}-{ms[-1]:.0f})"
                print(f"{label:<22} {name:<10} {spread:>16} {faults:>12.0f} {kernel:>15.1f}")
            pairs = zip(runs["glibc"], runs["tcmalloc"], strict=True)
            ratios[label] = statistics.median(glibc["ms"] / tc["ms"] for glibc, tc in pairs)
    for label, ratio in ratios.items():
        print(f"ratio glibc / tcmalloc, {label}: {ratio:.2f}x (each round's pair; median of {args.rounds})")


if __name__ == "__main__":
    main()
