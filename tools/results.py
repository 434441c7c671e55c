"""Reproduce docs/results.md: every row trained over seeds, evaluated, and summarised as mean and spread.

    .venv/bin/python tools/results.py                        # every run still missing, two at a time
    .venv/bin/python tools/results.py --only study           # the WAE-GAN study on the validation split
    .venv/bin/python tools/results.py --only mnist/wae_gan   # one row of the test tables, every seed
    .venv/bin/python tools/results.py --table                # the tables and figures from what is evaluated

Two kinds of rows. The **study** (MNIST WAE-GAN at lambda 1, 3, 10 and adaptive, with and without the official
code's stabilisers) trains on the training set less a held-out validation split and is evaluated on that split:
it is where a setting is chosen. The **test tables** (every model, MNIST and Fashion-MNIST) are evaluated on the
test split, once. Every row runs ``SEEDS`` seeds (``run.seed``), each its own run directory
``runs/results_<data>/<row>-s<seed>``; its command is printed beside the row.

Resumable: a run whose ``eval.json`` is there is not touched; a run trained but not evaluated is evaluated; a run
stopped midway continues from its checkpoint (``train.resume=auto``). Trainings run two at a time, one thread each.
A row's wall time is its runs' mean training time (from each run's log; a run continued from a checkpoint is left
out of it) and evaluation time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
TIMING = "results_timing.json"
OFF = ("model.input_noise=0", "model.init_std=null", "penalty.adversarial.init_std=null")
OFF += ("penalty.adversarial.reencode=false", "train.encoder_pretrain_steps=0")
COLUMNS = (  # eval.json key, column title, digits
    ("fid", "FID", 1),
    ("kid", "KID", 1),
    ("precision", "precision", 3),
    ("recall", "recall", 3),
    ("sharpness", "sharpness", 4),
    ("recon_mse", "test MSE", 4),
    ("latent_mmd", "latent MMD²", 4),
)


@dataclass(frozen=True)
class Row:
    data: str  # mnist | fashion_mnist
    model: str  # the configs/results/<data>/<model>.yaml it starts from
    name: str  # the row's name (its run directories are <name>-s<seed>)
    split: str  # val (the study) | test (the tables)
    overrides: tuple[str, ...] = ()

    def config(self) -> Path:
        return ROOT / "configs" / "results" / self.data / f"{self.model}.yaml"

    def run_dir(self, seed: int) -> Path:
        return ROOT / "runs" / f"results_{self.data}" / f"{self.name}-s{seed}"

    def train_args(self, seed: int) -> list[str]:
        split = [f"data.test=.data/shards/{self.data}_val/val"] if self.split == "val" else []
        return [str(self.config().relative_to(ROOT)), *self.overrides, *split, f"run.seed={seed}",
                f"run.name={self.name}-s{seed}"]  # fmt: skip

    def command(self, seed: int = 0) -> str:
        run = self.run_dir(seed).relative_to(ROOT)
        return f"vegan-scale train {' '.join(self.train_args(seed))} --quiet && vegan-scale eval {run}"


def study() -> list[Row]:
    """WAE-GAN on MNIST: lambda 1, 3, 10 and adaptive (from 10), each with the stabilisers and without."""
    rows = []
    adaptive = ("penalty.weight_schedule=adaptive", "penalty.adaptive_every=300")  # 1000 of 60,000 steps officially
    for label, weight in (
        ("l1", ("penalty.weight=1",)),
        ("l3", ("penalty.weight=3",)),
        ("l10", ()),
        ("adaptive", adaptive),
    ):
        rows.append(Row("mnist", "wae_gan", f"study_wae_gan_{label}", "val", weight))
        rows.append(Row("mnist", "wae_gan", f"study_wae_gan_{label}_plain", "val", (*weight, *OFF)))
    return rows


def tables() -> list[Row]:
    """Every model on both data sets, and MNIST's WAE-GAN as configs/mnist/wae_gan.yaml ships it (lambda 10,
    constant) beside the schedule the study chose."""
    rows = [Row(data, model, model, "test") for data in ("mnist", "fashion_mnist")
            for model in ("vae", "aae", "wae_mmd", "wae_gan", "swae")]  # fmt: skip
    return [*rows, Row("mnist", "wae_gan", "wae_gan_shipped", "test", ("penalty.weight_schedule=constant",))]


def _vegan(args: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("a") as out:
        done = subprocess.run([sys.executable, "-m", "vegan_scale", *args], cwd=ROOT, env=env, stdout=out, stderr=out)
    if done.returncode:
        raise SystemExit(f"vegan-scale {' '.join(args)} exited {done.returncode}; see {log}")


def ensure_split(data: str) -> None:
    """The shards with a validation split held out of the training set, written once."""
    out = ROOT / ".data" / "shards" / f"{data}_val"
    if not (out / "val" / "sizes.json").exists():
        _vegan(
            ["shards", data.replace("_", "-"), "--validation", "10000", "--out", str(out)], ROOT / "runs" / "split.log"
        )


def reproduce(row: Row, seed: int) -> None:
    """Train (or continue), evaluate, and for seed 0 of a test row draw the figures."""
    directory = row.run_dir(seed)
    if (directory / "eval.json").exists():
        return
    log = directory.parent / f"{directory.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    status = directory / "exit_status.json"
    if not (status.exists() and json.loads(status.read_text())["code"] == 0):
        _vegan(["train", *row.train_args(seed), "--quiet"], log)  # its time is read from its log (train_seconds)
    start = time.perf_counter()
    _vegan(["eval", str(directory)], log)
    (directory / TIMING).write_text(json.dumps({"eval_s": time.perf_counter() - start}))
    if row.split == "test" and seed == 0:
        _vegan(["sample", str(directory), "--out", str(ROOT / "docs" / "results" / row.data / row.name)], log)
    print(f"{row.name} seed {seed}: done ({log})", flush=True)


def _spread(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f} (1 seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def train_seconds(directory: Path) -> float | None:
    """A run's training time from its log: that of its last sitting, if that sitting trained from the first step.
    None for a run continued from a checkpoint (a session ended midway): its sittings repeat or skip steps, so
    no sum of them is the run's time."""
    sittings: list[list] = []  # per start of the command: [first time, last time, first step logged]
    for line in (directory / "train.log").read_text().splitlines():
        try:
            when = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        except ValueError:
            continue
        if "| run directory: " in line or not sittings:
            sittings.append([when, when, None])
        sittings[-1][1] = when
        if sittings[-1][2] is None and (step := re.search(r"\| step (\d+)/", line)):
            sittings[-1][2] = int(step[1])
    first, last, step = sittings[-1]
    return (last - first).total_seconds() if step == sittings[0][2] else None


def summary(rows: list[Row], title: str) -> str:
    """A markdown table: per row, each metric's mean ± standard deviation over the seeds evaluated, the number of
    seeds, the mean wall time of a run, and the real-data floor."""
    split = "validation" if rows and rows[0].split == "val" else "test"
    titles = [column.replace("test", split) for _, column, _ in COLUMNS]
    header = "| row | " + " | ".join(titles) + " | seeds | minutes per run |"
    lines = [f"\n### {title}\n", header, "|" + "---|" * (len(COLUMNS) + 3)]
    floor = None
    for row in rows:
        results = [json.loads(p.read_text()) for s in SEEDS if (p := row.run_dir(s) / "eval.json").exists()]
        minutes = [(train + json.loads((row.run_dir(s) / TIMING).read_text())["eval_s"]) / 60 for s in SEEDS
                   if (row.run_dir(s) / "eval.json").exists() and (train := train_seconds(row.run_dir(s)))]  # fmt: skip
        cells = [_spread([r["model"][k] for r in results], d) for k, _, d in COLUMNS]
        wall = f"{statistics.mean(minutes):.1f}" if minutes else "–"
        lines.append(f"| {row.name} | " + " | ".join(cells) + f" | {len(results)} | {wall} |")
        floor = results[0]["real"] if results else floor
    if floor:
        cells = [f"{floor[k]:.{d}f}" if k in floor else "–" for k, _, d in COLUMNS]
        lines.append("| *real data (floor)* | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


def curves(data: str, rows: list[Row]) -> Path | None:
    """docs/results/curves_<data>.png: test reconstruction (MSE) and latent MMD² over training, per model, the mean
    over seeds with their range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    drawn = False
    for row in (r for r in rows if r.data == data):
        series = []
        for seed in SEEDS:
            path = row.run_dir(seed) / "metrics.jsonl"
            lines = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
            series.append({m["step"]: m for m in lines if "eval/mse" in m})
        steps = sorted(set.intersection(*(set(s) for s in series))) if all(series) else []
        for ax, key in zip(axes, ("eval/mse", "eval/latent_mmd"), strict=True):
            if not steps or not all(key in s[steps[0]] for s in series):
                continue
            values = [[s[t][key] for s in series] for t in steps]
            ax.plot(steps, [statistics.mean(v) for v in values], label=row.name)
            ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    for ax, title in zip(axes, ("test reconstruction (per-pixel MSE)", "latent MMD² to the prior"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    out = ROOT / "docs" / "results" / f"curves_{data}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", help="'study', 'tables', or rows such as mnist/wae_gan")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--table", action="store_true", help="print the tables and draw the curves only")
    args = p.parse_args()
    everything = study() + tables()
    if not args.table:
        wanted = [r for r in everything if not args.only or {"study" if r.split == "val" else "tables",
                                                             f"{r.data}/{r.name}"} & set(args.only)]  # fmt: skip
        for data in sorted({r.data for r in wanted}):
            ensure_split(data)
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda job: reproduce(*job), [(r, s) for s in SEEDS for r in wanted]))
    print(summary(study(), "WAE-GAN study, MNIST, validation split"))
    for data in ("mnist", "fashion_mnist"):
        print(summary([r for r in tables() if r.data == data], f"{data}, test split"))
        curves(data, [r for r in tables() if r.data == data])
    print("\n| row | command (seed 0; the others change run.seed and run.name) |\n|---|---|")
    for row in everything:
        print(f"| {row.data} {row.name} | `{row.command()}` |")


if __name__ == "__main__":
    main()
