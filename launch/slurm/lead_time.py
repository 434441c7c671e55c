"""The --signal lead a run needs, from what one of its runs measured: `python launch/slurm/lead_time.py RUN_DIR`.

After the signal the trainer finishes a checkpoint it may be writing, runs on to its next check (at most
train.check_every steps), writes a checkpoint and exits; slurmctld sends a time-limit signal up to 30 s late (its
time-limit check runs about every 30 s). So

    lead >= check_every * step time + 2 * checkpoint time + exit + 30 s

taken from the slowest step interval (perf/step_ms) and the slowest checkpoint (perf/checkpoint_s) in
RUN_DIR/metrics.jsonl, with a safety factor on the measured part. An evaluation (eval.every_steps) that falls in
between adds its time.
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
    step_ms, checkpoint_s = [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            values = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        step_ms += [values["perf/step_ms"]] if "perf/step_ms" in values else []
        checkpoint_s += [values["perf/checkpoint_s"]] if "perf/checkpoint_s" in values else []
    if not step_ms or not checkpoint_s:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no perf/step_ms or no perf/checkpoint_s yet: let it checkpoint")
    measured = check_every * max(step_ms) / 1e3 + 2 * max(checkpoint_s) + EXIT_S
    lead = math.ceil(safety * measured + SLURMCTLD_LATENESS_S)
    how = (
        f"{safety:g} x ({check_every} steps x {max(step_ms) / 1e3:.3f} s + 2 checkpoints x {max(checkpoint_s):.1f} s + "
        f"exit {EXIT_S:.0f} s) + {SLURMCTLD_LATENESS_S:.0f} s slurmctld lateness"
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
