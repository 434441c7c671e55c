"""Data-parallel scaling on this machine: 1 process against 2 (one thread each), and global against local MMD.

    .venv/bin/python bench/scaling.py          # about 5 minutes on 2 cores

Trains the default MNIST experiment (configs/mnist/quickstart.yaml, global batch 100) for a fixed number of steps
as (a) one process, (b) two DDP processes through launch/accelerate/cpu_ddp.yaml with the global MMD, (c) the same
with the local MMD; each run twice, alternating, keeping the faster. Throughput is the run's samples/s over its
steps after the first logging interval (start-up and warm-up excluded), read from its metrics.jsonl. The last
line is the 2-process speed-up (target: at least 1.8); the line before it, the cost of the global MMD over the
local one (target: at most 5%).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def run(name: str, processes: int, scope: str, steps: int, root: Path) -> float:
    args = [
        "-m",
        "vegan_scale",
        "train",
        str(ROOT / "configs/mnist/quickstart.yaml"),
        f"train.max_steps={steps}",
        f"run.root={root}",
        f"run.name={name}",
        "tracking.backend=none",
        "tracking.log_every=25",
        f"eval.every_steps={steps}",
        "checkpoint.every_steps=0",
        "data.num_workers=0",
        f"penalty.mmd.scope={scope}",
    ]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch/accelerate/cpu_ddp.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (root / "mnist" / name / "metrics.jsonl").read_text().splitlines()]
    step_ms = [m["perf/step_ms"] for m in lines if "perf/step_ms" in m][1:]  # the first interval holds warm-up
    return 100 * 1000 / (sum(step_ms) / len(step_ms))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    layouts = {
        "1 process": (1, "global"),
        "2 processes, global MMD": (2, "global"),
        "2 processes, local MMD": (2, "local"),
    }
    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(2):
            for i, (label, (processes, scope)) in enumerate(layouts.items()):
                rate = run(f"r{repeat}-{i}", processes, scope, args.steps, Path(tmp))
                best[label] = max(best.get(label, 0.0), rate)
    for label, rate in best.items():
        print(f"{label:<26} {rate:8.0f} samples/s")
    overhead = best["2 processes, local MMD"] / best["2 processes, global MMD"] - 1
    print(f"global MMD costs {100 * overhead:+.1f}% step time over local MMD (2 processes, global batch 100)")
    print(f"headline: 2 processes run {best['2 processes, global MMD'] / best['1 process']:.2f}x one process")


if __name__ == "__main__":
    main()
