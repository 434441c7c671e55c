"""Reproduce docs/results.md: train every model of configs/results/, evaluate it, draw its figures, print the tables.

    .venv/bin/python tools/results.py                   # all 12 runs, two at a time (about an hour on 2 cores)
    .venv/bin/python tools/results.py --only mnist/vae  # one row
    .venv/bin/python tools/results.py --table           # only the tables, from runs already evaluated

Each row is `vegan-scale train configs/results/<data>/<model>.yaml`, then `vegan-scale eval` on its run directory
(runs/results_<data>/<model>) and `vegan-scale sample` into docs/results/<data>/<model>/. Runs share the cores:
each training gets cores / jobs threads. A finished run is not trained again (its run directory holds
exit_status.json with code 0); delete the directory to start over.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("mnist", "fashion_mnist")
MODELS = ("vae", "aae", "wae_mmd", "wae_gan", "wae_gan_lambda1", "swae")
TIMING = "results_timing.json"
COLUMNS = (  # eval.json key, column title, digits
    ("fid", "FID", 2),
    ("kid", "KID", 4),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("sharpness", "sharpness", 4),
    ("recon_cost", "test recon (cost)", 3),
    ("recon_mse", "test MSE", 4),
    ("latent_mmd", "latent MMD²", 4),
)


def run_dir(row: str) -> Path:
    data, model = row.split("/")
    return ROOT / "runs" / f"results_{data}" / model


def _vegan(args: list[str], threads: int, log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", "vegan_scale", *args], cwd=ROOT, env=env, stdout=out, stderr=out)
    if done.returncode:
        raise SystemExit(f"vegan-scale {' '.join(args)} exited {done.returncode}; see {log}")


def reproduce(row: str, threads: int) -> None:
    """Train (unless already finished), evaluate and draw one row."""
    directory, config = run_dir(row), ROOT / "configs" / "results" / f"{row}.yaml"
    log = ROOT / "runs" / f"results_{row.replace('/', '_')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    status = directory / "exit_status.json"
    if not (status.exists() and json.loads(status.read_text())["code"] == 0):
        start = time.perf_counter()
        _vegan(["train", str(config), "--quiet"], threads, log)
        (directory / TIMING).write_text(json.dumps({"train_s": time.perf_counter() - start, "threads": threads}))
    _vegan(["eval", str(directory)], threads, log)
    _vegan(["sample", str(directory), "--out", str(ROOT / "docs" / "results" / row)], threads, log)
    print(f"{row}: done ({log})", flush=True)


def tables() -> str:
    """One markdown table per data set: each model's metrics, then the real-data floor."""
    parts = []
    for data in DATASETS:
        header = "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " | train time |"
        lines = [f"\n### {data}\n", header, "|" + "---|" * (len(COLUMNS) + 2)]
        floor = None
        for model in MODELS:
            path = run_dir(f"{data}/{model}") / "eval.json"
            if not path.exists():
                lines.append(f"| {model} | " + " | ".join("not run" for _ in COLUMNS) + " | |")
                continue
            result = json.loads(path.read_text())
            floor = result["real"]
            timing = json.loads((path.parent / TIMING).read_text()) if (path.parent / TIMING).exists() else None
            minutes = f"{timing['train_s'] / 60:.1f} min ({timing['threads']} thr.)" if timing else "?"
            cells = [f"{result['model'][key]:.{digits}f}" for key, _, digits in COLUMNS]
            lines.append(f"| {model} | " + " | ".join(cells) + f" | {minutes} |")
        if floor is not None:
            cells = [f"{floor[key]:.{digits}f}" if key in floor else "–" for key, _, digits in COLUMNS]
            lines.append("| *real data (floor)* | " + " | ".join(cells) + " | |")
        parts.append("\n".join(lines))
    return "\n".join(parts) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="rows to run, e.g. mnist/vae fashion_mnist/wae_gan")
    p.add_argument("--jobs", type=int, default=2, help="trainings at a time")
    p.add_argument("--table", action="store_true", help="print the tables only")
    args = p.parse_args()
    if not args.table:
        rows = args.only or [f"{d}/{m}" for d in DATASETS for m in MODELS]
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda row: reproduce(row, threads), rows))
    print(tables())


if __name__ == "__main__":
    main()
