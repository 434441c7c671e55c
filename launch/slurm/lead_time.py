"""The --signal lead a run needs, from what one of its runs measured: `python launch/slurm/lead_time.py RUN_DIR`.

After the signal the trainer finishes a checkpoint it may be writing, runs on to its next check (at most
train.check_every steps), evaluates if that step is an evaluation step (eval.every_steps), writes a checkpoint and
exits; slurmctld sends a time-limit signal up to 30 s late (its time-limit check runs about every 30 s). So

    lead >= check_every * step time + 2 * checkpoint time + evaluation time + exit + 30 s

taken from the slowest step interval (perf/step_ms), the slowest checkpoint (perf/checkpoint_s) and the slowest
evaluation (perf/eval_s, none if the run has not evaluated yet) in RUN_DIR/metrics.jsonl, with a safety factor on
the measured part.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import yaml

SLURMCTLD_LATENESS_S = 30.0
EXIT_S = 10.0  # closing the tracker, the process group and the interpreters


def lead_seconds(run_dir: Path, safety: float = 2.0) -> tuple[int, str]:
    """The lead in whole seconds, and how it was reckoned."""
    check_every = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["check_every"]
    seen: dict[str, list[float]] = {"perf/step_ms": [], "perf/checkpoint_s": [], "perf/eval_s": []}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            values = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        for key, found in seen.items():
            found += [values[key]] if key in values else []
    if not seen["perf/step_ms"] or not seen["perf/checkpoint_s"]:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no perf/step_ms or no perf/checkpoint_s yet: let it checkpoint")
    step_s, checkpoint_s = max(seen["perf/step_ms"]) / 1e3, max(seen["perf/checkpoint_s"])
    eval_s = max(seen["perf/eval_s"], default=0.0)  # none: the run has not evaluated yet
    measured = check_every * step_s + 2 * checkpoint_s + eval_s + EXIT_S
    lead = math.ceil(safety * measured + SLURMCTLD_LATENESS_S)
    how = (
        f"{safety:g} x ({check_every} steps x {step_s:.3f} s + 2 checkpoints x {checkpoint_s:.1f} s + evaluation "
        f"{eval_s:.1f} s + exit {EXIT_S:.0f} s) + {SLURMCTLD_LATENESS_S:.0f} s slurmctld lateness"
    )
    return lead, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with metrics.jsonl and config.yaml")
    parser.add_argument("--safety", type=float, default=2.0, help="factor on the measured times (default 2)")
    args = parser.parse_args()
    lead, how = lead_seconds(args.run_dir, args.safety)
    print(f"#SBATCH --signal=B:USR1@{lead}   ({how}; USR1@{lead} for train_srun_native.sbatch)")


if __name__ == "__main__":
    main()
