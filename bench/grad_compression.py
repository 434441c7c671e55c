"""Gradients all-reduced in bf16 against float32, on the wire: 2 DDP processes over gloo on this machine.

    .venv/bin/python bench/grad_compression.py          # about 3 minutes on 2 cores

Trains configs/mnist/quickstart.yaml as 2 DDP processes (launch/accelerate/cpu_ddp.yaml, deterministic, tracking
off) with train.grad_compression=none and =bf16, each for a short and a long run; the bytes the two processes
send to each other per step are the difference of the loopback interface's transmitted bytes (/proc/net/dev, so
run it on a quiet machine) between the long and the short run, over the difference in steps: start-up and the
first broadcast of the weights cancel out. Predicted: a ring all-reduce over 2 processes sends each gradient byte
once per process, 2 x 4 bytes per parameter per step in float32 (2 x 2 in bf16), plus a little for the global
MMD's all-gather and the agreement checks. Also the steps' throughput, and how far the bf16 run's per-step
losses drift from the float32 run's over the long run (the step equivalence; stated tolerance: 2% relative).
The last line is the ratio of bytes per step, bf16 over float32 (target: at most 0.55).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHORT, LONG = 20, 80
TOLERANCE = 0.02


def loopback_sent() -> int:
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, counters = line.partition(":")
        if name.strip() == "lo":
            return int(counters.split()[8])  # transmitted bytes
    sys.exit("no loopback interface in /proc/net/dev: this benchmark needs Linux")


def train(root: Path, name: str, compression: str, steps: int) -> tuple[int, list[dict]]:
    """Bytes sent on the loopback while the run ran, and its metrics.jsonl lines."""
    args = [
        "-m",
        "vegan_scale",
        "train",
        str(ROOT / "configs/mnist/quickstart.yaml"),
        f"run.root={root}",
        f"run.name={name}",
        f"train.max_steps={steps}",
        f"train.grad_compression={compression}",
        "train.deterministic=true",
        "train.encoder_pretrain_steps=0",
        "tracking.backend=none",
        "tracking.log_every=10",
        f"eval.every_steps={steps}",
        "checkpoint.every_steps=0",
        "data.num_workers=0",
    ]
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch/accelerate/cpu_ddp.yaml"), *args]
    before = loopback_sent()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    sent = loopback_sent() - before
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (root / "mnist" / name / "metrics.jsonl").read_text().splitlines()]
    return sent, lines


def parameters() -> int:
    import torch

    from vegan_scale.experiment import load_experiment
    from vegan_scale.registry import build_model

    with torch.device("meta"):
        model = build_model(load_experiment(ROOT / "configs/mnist/quickstart.yaml"))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    params = parameters()
    per_step, throughput, losses = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for compression in ("none", "bf16"):
            short, _ = train(Path(tmp), f"{compression}-short", compression, SHORT)
            long, lines = train(Path(tmp), f"{compression}-long", compression, LONG)
            per_step[compression] = (long - short) / (LONG - SHORT)
            step_ms = [m["perf/step_ms"] for m in lines if "perf/step_ms" in m][1:]
            throughput[compression] = 1000 * 100 / (sum(step_ms) / len(step_ms))
            losses[compression] = {m["step"]: m["train/loss"] for m in lines if "train/loss" in m}
    print(f"quickstart network: {params / 1e6:.2f}M parameters; 2 processes, gloo, loopback")
    print(f"{'gradients':10s} {'bytes/step sent':>16s} {'predicted':>12s} {'samples/s':>10s}")
    for compression, size in (("none", 4), ("bf16", 2)):
        predicted = 2 * size * params
        print(f"{compression:10s} {per_step[compression]:16,.0f} {predicted:12,.0f} {throughput[compression]:10.0f}")
    drift = max(abs(losses["bf16"][s] - losses["none"][s]) / abs(losses["none"][s]) for s in losses["none"])
    verdict = "within" if drift <= TOLERANCE else "OUTSIDE"
    print(f"per-step loss, bf16 against float32 gradients, over {LONG} steps: at most {drift:.2%} apart "
          f"({verdict} the {TOLERANCE:.0%} tolerance)")  # fmt: skip
    print(f"samples/s, bf16 / float32 gradients: {throughput['bf16'] / throughput['none']:.2f}x")
    print(f"headline: bf16 gradients send {per_step['bf16'] / per_step['none']:.2f}x the bytes of float32 "
          "(target: at most 0.55)")  # fmt: skip


if __name__ == "__main__":
    main()
