"""The whole `vegan-scale train` command against its bare training step, on the same network, batch and machine.

    .venv/bin/python bench/command_vs_step.py          # about 5 minutes on 2 cores

For pythae's MNIST conv pair and the MLP pair (WAE-MMD, batch 100, local MMD, no encoder pre-training): the bare
step's samples/s (the engine's own step on in-memory batches, `bench/step_under_test.py`), then the command's: the
real MNIST shards through the loader (1 worker), the rank agreement every `train.check_every` steps, the metric
buffer and MLflow tracking into a local sqlite store on, checkpoints and evaluations off. The command's throughput
is read from its own `perf/step_ms` over the logging intervals after the first (start-up and warm-up excluded);
`perf/data_ms` (waiting for the next batch) and `perf/agree_ms` (the agreement) say where the difference goes,
the rest being the loop's own work (the metric buffer's flushes, the host-side bookkeeping of a step). A third
column times the bare step while the command's loader delivers a batch per step beside it (taken and dropped):
what the loader worker costs the step when both share the machine's cores. Each side runs twice, alternating,
the faster kept. The last line is the ratio closest to its target (conv pair 0.95x, MLP
0.85x).
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from step_under_test import training_step  # noqa: E402

from vegan_scale.data.images import load_images  # noqa: E402
from vegan_scale.data.index import read_index  # noqa: E402
from vegan_scale.distributed.accelerator import BatchLayout  # noqa: E402
from vegan_scale.engine.feed import open_stream  # noqa: E402
from vegan_scale.experiment import load_experiment  # noqa: E402

CASES = (  # label, network overrides, timed steps, logging interval, target
    ("conv pair", ["model.network=pythae_conv"], 30, 10, 0.95),
    ("MLP pair", ["model.network=mlp", "model.mlp.hidden=[512]"], 1500, 250, 0.85),
)
BATCH = 100


def loader_batches() -> Iterator:
    """The command's stream of batches (the real MNIST shards, one loader worker), epoch after epoch."""
    shards = ROOT / ".data/shards/mnist/train"
    cfg = load_experiment(ROOT / "configs/mnist/wae_mmd.yaml", ["data.num_workers=1", f"data.train={shards}"])
    stream = open_stream(cfg, SimpleNamespace(process_index=0, num_processes=1), BatchLayout.derive(BATCH, 1, None))
    return (batch for _, batch in stream.epochs(0))


def bare(overrides: list[str], images: Path, steps: int, beside_loader: bool = False) -> float:
    """Samples/s of the bare step; ``beside_loader``: while the command's loader delivers a batch per step (taken
    and dropped: what its worker costs the step on a machine whose cores the step uses)."""
    step = training_step(overrides[0].split("=")[1], overrides[1:], images)
    batches = loader_batches() if beside_loader else itertools.repeat(None)
    for _ in range(max(3, steps // 10)):
        next(batches)
        step()
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
        loss = step()
    loss.item()
    return steps * BATCH / (time.perf_counter() - start)


def command(overrides: list[str], steps: int, every: int, root: Path, name: str) -> dict[str, float]:
    args = [
        sys.executable,
        "-m",
        "vegan_scale",
        "train",
        str(ROOT / "configs/mnist/wae_mmd.yaml"),
        *overrides,
        f"run.root={root}",
        f"run.name={name}",
        f"train.max_steps={steps + every}",  # the first interval is warm-up
        "train.encoder_pretrain_steps=0",
        "penalty.mmd.scope=local",
        "checkpoint.every_steps=0",
        "eval.every_steps=1000000",
        f"tracking.log_every={every}",
        "data.num_workers=1",
        "--quiet",
    ]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    lines = [json.loads(x) for x in (root / "mnist" / name / "metrics.jsonl").read_text().splitlines()]
    timed = [m for m in lines if "perf/step_ms" in m][1:]
    mean = {k: sum(m[k] for m in timed) / len(timed) for k in ("perf/step_ms", "perf/data_ms", "perf/agree_ms")}
    return {"samples_per_sec": BATCH * 1000 / mean["perf/step_ms"], **mean}


def main() -> None:
    index = read_index(str(ROOT / ".data/shards/mnist/train"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images.npy"
        np.save(images, load_images(index, (1, 28, 28), 2000)[0].numpy())
        for label, overrides, steps, every, target in CASES:
            best_bare, best_beside, best = 0.0, 0.0, None
            for attempt in range(2):
                best_bare = max(best_bare, bare(overrides, images, steps))
                best_beside = max(best_beside, bare(overrides, images, steps, beside_loader=True))
                got = command(overrides, steps, every, Path(tmp), f"{label.split()[0]}-{attempt}")
                best = got if best is None or got["samples_per_sec"] > best["samples_per_sec"] else best
            rows.append((label, best_bare, best_beside, best, target))
    print(
        f"{'network':10s} {'bare step':>10s} {'+ loader':>9s} {'command':>9s} {'ratio':>6s}"
        "   ms per step: bare, + loader, command (of which data, agree)"
    )
    for label, step_rate, beside, got, _ in rows:
        print(
            f"{label:10s} {step_rate:10.0f} {beside:9.0f} {got['samples_per_sec']:9.0f} "
            f"{got['samples_per_sec'] / step_rate:6.2f}   {1e3 * BATCH / step_rate:.2f}, {1e3 * BATCH / beside:.2f}, "
            f"{got['perf/step_ms']:.2f} ({got['perf/data_ms']:.2f}, {got['perf/agree_ms']:.2f})"
        )
    label, step_rate, _, got, target = min(rows, key=lambda r: r[3]["samples_per_sec"] / r[1] - r[4])
    ratio = got["samples_per_sec"] / step_rate
    print(f"headline: the command runs {ratio:.2f}x its bare step ({label}, target {target})")


if __name__ == "__main__":
    main()
