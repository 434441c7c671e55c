"""launch/slurm/lead_time.py: the --signal lead from a run's measured step and checkpoint times (no cluster needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.paths import ROOT


def test_lead_covers_check_interval_checkpoints_evaluation_exit_and_lateness(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("train:\n  check_every: 50\n")
    lines = [
        {"step": 50, "train/loss": 1.0, "perf/step_ms": 400.0},
        {"step": 50, "perf/checkpoint_s": 12.0},
        {"step": 100, "train/loss": 0.9, "perf/step_ms": 500.0},
        {"step": 100, "eval/recon": 0.5, "perf/eval_s": 7.0},
        {"step": 100, "perf/checkpoint_s": 15.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 1')
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch/slurm/lead_time.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    # 2 x (50 x 0.5 s + 2 x 15 s + 7 s + 10 s) + 30 s = 174 s
    assert proc.stdout.startswith("#SBATCH --signal=B:USR1@174 "), proc.stdout
