"""Run checks in several real processes over gloo, many checks per process group, with one launch.

A check is a function ``(ctx: Context) -> dict`` in a ``checks_*.py`` module of this package, registered with
:func:`check`. One launch (``torch.distributed.run``, two processes on this machine) runs every requested check
in order inside the same process group; each rank writes ``rank<R>.json`` with, per check, either its returned
JSON-able result or the error. Tests read the results through :func:`run_checks` (pytest side), so adding a
multi-process test costs a function here and an assertion there, not another launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.paths import ROOT

REGISTRY: dict[str, Callable[[Context], dict]] = {}


@dataclass
class Context:
    """What a check gets: its rank, the world size, the Accelerator and a directory shared by all ranks."""

    rank: int
    world_size: int
    accelerator: Any
    shared_dir: Path


def check(fn: Callable[[Context], dict]) -> Callable[[Context], dict]:
    REGISTRY[fn.__name__] = fn
    return fn


def run_checks(names: list[str], out_dir: Path, nproc: int = 2, timeout: float = 300) -> dict[str, list[dict]]:
    """Launch ``nproc`` processes running the checks ``names``; returns {name: [rank 0 record, rank 1 record, ...]}.

    A record is {"ok": True, "result": ...} or {"ok": False, "error": "..."}.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "tests.multiproc.worker",
        str(out_dir),
        *names,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    records: dict[str, list[dict]] = {name: [] for name in names}
    for rank in range(nproc):
        path = out_dir / f"rank{rank}.json"
        if not path.exists():
            raise RuntimeError(f"rank {rank} wrote no results (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        for name, record in json.loads(path.read_text()).items():
            records[name].append(record)
    return records


def results_fixture(names: list[str], timeout: float = 300) -> Callable[..., dict[str, list[dict]]]:
    """A module-scoped pytest fixture that launches the checks ``names`` once, fails if any rank's check failed,
    and gives {name: [rank 0 result, rank 1 result, ...]}: ``results = results_fixture(CHECKS)`` in a test module."""
    import pytest

    @pytest.fixture(scope="module")
    def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
        records = run_checks(names, Path(tmp_path_factory.mktemp("multiproc")), timeout=timeout)
        for name, per_rank in records.items():
            for rank, record in enumerate(per_rank):
                assert record["ok"], f"check {name} failed on rank {rank}:\n{record['error']}"
        return {name: [r["result"] for r in per_rank] for name, per_rank in records.items()}

    return results
