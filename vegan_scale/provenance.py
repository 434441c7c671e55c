"""Where a run's code and job come from: the package version, the git commit, the SLURM job.

What a person filters runs by in the tracking UI; none of it changes what is computed.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

DISTRIBUTION = "vegan_scale"


def version() -> str:
    """The installed package's version (from its metadata; pyproject.toml is the one place it is written)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def git_tags() -> dict[str, str]:
    """The commit of the checkout vegan_scale runs from (MLflow shows ``mlflow.source.git.commit`` on the run's
    page) and whether it had uncommitted changes; nothing when the code is not in a git checkout or git is absent
    (an installed package, a container image)."""
    source = Path(__file__).resolve().parent
    try:
        commit = _git(source, "rev-parse", "HEAD")
        dirty = bool(_git(source, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git.dirty": str(dirty).lower()}


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def job_tags() -> dict[str, str]:
    """The SLURM job (and job array) and how often it was requeued, when the run is one."""
    variables = {
        "SLURM_JOB_ID": "slurm.job_id",
        "SLURM_RESTART_COUNT": "slurm.restart_count",
        "SLURM_ARRAY_JOB_ID": "slurm.array_job_id",
        "SLURM_ARRAY_TASK_ID": "slurm.array_task_id",
    }
    return {tag: os.environ[variable] for variable, tag in variables.items() if variable in os.environ}


def tags() -> dict[str, str]:
    """Everything above, as MLflow tags."""
    return {"vegan_scale.version": version(), **git_tags(), **job_tags()}
