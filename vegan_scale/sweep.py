"""Sweeps: a grid file expands into training tasks, each a config and its overrides, run by a SLURM job array
(``launch/slurm/sweep.sbatch``, one array task per training task) or on this machine (``vegan-scale sweep --run``).

A grid file (YAML)::

    name: mnist-seeds                      # the sweep: run names start with it, and its MLflow tag
    configs: [configs/mnist/wae_mmd.yaml, configs/mnist/wae_gan.yaml]
    grid:                                  # every combination of these values, for each config
      run.seed: [0, 1, 2]
      penalty.weight: [1.0, 10.0]
    overrides: [train.max_steps=2000]      # the same for every task

Task ``i`` is the same on every machine (configs in order, then the grid's combinations with the last key varying
fastest). Its run is named ``<name>-<config>-<key><value>...`` (``mnist-seeds-wae_gan-seed1-weight10.0``), so a
task that is run again (requeued, resubmitted, ``--run`` a second time) continues its own run, and it carries the
MLflow tags ``sweep`` and ``sweep_task``: the MLflow UI groups a sweep with the filter ``tags.sweep = 'mnist-seeds'``.
Listing the tasks (and ``--run``) checks every one against the schema: a typo fails before anything is submitted.
An array task's ``--task N`` and ``--count`` load no other task (a thousand tasks took a minute and a half each).
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vegan_scale.config.validate import NAME
from vegan_scale.config.yaml_file import read_yaml
from vegan_scale.errors import ConfigError, ExitCode, VeganError
from vegan_scale.experiment import load_experiment, text_key
from vegan_scale.rundir import RunDir

log = logging.getLogger(__name__)

KEYS = {"name", "configs", "grid", "overrides"}
MAX_TASKS = 10_000  # expanded and checked one by one before anything runs
SET_BY_THE_SWEEP = {"run.name", "tracking.tags.sweep", "tracking.tags.sweep_task"}


@dataclass(frozen=True)
class Task:
    """One training run of a sweep."""

    index: int
    config: str
    overrides: tuple[str, ...]  # the sweep's, the grid point's, then its run name and tags
    run_dir: RunDir  # where its run goes, from its resolved configuration

    @property
    def run_name(self) -> str:
        return self.run_dir.path.name


def tasks(path: str | Path, only: int | None = None) -> list[Task]:
    """The tasks of a grid file, each checked against the schema (a ConfigError names the file and the task); with
    ``only``, that task alone is loaded (a job array's task needs its own, not a thousand others' first)."""
    found = points(path)
    if only is not None:
        if not 0 <= only < len(found):
            raise ConfigError(f"{path} has tasks 0 to {len(found) - 1}, not {only}")
        found = [found[only]]
    return [_loaded(Path(path), *point) for point in found]


def points(path: str | Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """The tasks of a grid file as (index, config, overrides), in order, their run names distinct; not loaded."""
    path = Path(path)
    name, configs, grid, common = _read(path)
    found = []
    for config, combination in itertools.product(configs, itertools.product(*grid.values())):
        point = dict(zip(grid, combination, strict=True))
        run = "-".join([name, Path(config).stem, *(f"{key.rsplit('.', 1)[-1]}{_slug(v)}" for key, v in point.items())])
        overrides = (
            *common,
            *(f"{key}={_text(value)}" for key, value in point.items()),
            f"run.name={run}",
            f"tracking.tags.sweep={name}",
            f"tracking.tags.sweep_task={len(found)}",
        )
        found.append((len(found), str(config), overrides))
    names = [_run_name(overrides) for _, _, overrides in found]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{path}: grid points share run names ({', '.join(twice[:3])}): make the values differ")
    return found


def _run_name(overrides: tuple[str, ...]) -> str:
    return next(o for o in overrides if o.startswith("run.name=")).removeprefix("run.name=")


def _loaded(path: Path, index: int, config: str, overrides: tuple[str, ...]) -> Task:
    try:
        cfg = load_experiment(config, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: task {index} ({config} {' '.join(overrides)}): {e}") from None
    return Task(index, config, overrides, RunDir(Path(cfg.run.root) / cfg.run.experiment / _run_name(overrides)))


def _read(path: Path) -> tuple[str, list[str], dict[str, list[Any]], list[str]]:
    """(name, configs, grid, common overrides) of a grid file, checked."""
    try:
        spec = read_yaml(path, lambda key: key.startswith("grid.") and text_key(key.removeprefix("grid.")))
    except OSError as e:
        raise ConfigError(f"cannot read the grid file {path}: {e}") from None
    if not isinstance(spec, dict) or not {"name", "configs"} <= set(spec) or set(spec) - KEYS:
        raise ConfigError(f"{path}: a grid file holds name, configs, and optionally grid and overrides ({_HOWTO})")
    name, configs, grid, common = spec["name"], spec["configs"], spec.get("grid") or {}, spec.get("overrides") or []
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(
            f"{path}: name {name!r} must be text of letters, digits, '.', '_' or '-' (it starts run names; quote a "
            "number)"
        )
    if (
        not configs
        or not _strings(configs)
        or not _strings(common)
        or not isinstance(grid, dict)
        or not _strings(list(grid))
    ):
        raise ConfigError(
            f"{path}: configs must be a list of experiment files, overrides a list of key=value, and grid a mapping "
            f"of keys ({_HOWTO})"
        )
    if any(not isinstance(values, list) or not values for values in grid.values()):
        raise ConfigError(f"{path}: every grid key needs a list of values ({_HOWTO})")
    set_twice = [key for key in [*grid, *(o.partition("=")[0] for o in common)] if key in SET_BY_THE_SWEEP]
    set_twice += [o.partition("=")[0] for o in common if o.partition("=")[0] in grid]
    if set_twice:
        raise ConfigError(
            f"{path}: {', '.join(sorted(set(set_twice)))} would be set twice: the sweep sets run.name and its "
            "tags, and a grid key is not also a common override"
        )
    count = math.prod(len(values) for values in grid.values()) * len(configs)
    if count > MAX_TASKS:
        raise ConfigError(
            f"{path}: the grid makes {count:,} tasks, more than the {MAX_TASKS:,} a sweep may hold (SLURM's default "
            "MaxArraySize is 1001); split it into several grid files"
        )
    stems = [Path(c).stem for c in configs]
    if len(set(stems)) != len(stems):
        raise ConfigError(f"{path}: two configs are named {stems}: the run names would collide")
    return name, configs, grid, common


def _strings(items: Any) -> bool:
    """Whether ``items`` is a list of text (an empty list of overrides is one)."""
    return isinstance(items, list) and all(isinstance(item, str) for item in items)


def _slug(value: Any) -> str:
    """A grid value as part of a run name: [256, 512] becomes 256_512."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", _text(value)).strip("_")


def _text(value: Any) -> str:
    """A grid value as an override's value (lists in YAML flow style)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


_HOWTO = "see vegan_scale/sweep.py or launch/slurm/README.md for the format"


def command(grid: Path, count: bool = False, task: int | None = None, here: bool = False, jobs: int = 1) -> None:
    """``vegan-scale sweep``: list the tasks, print their number or one task (NUL-ended words, for a batch
    script), or run them here."""
    if count:
        print(len(points(grid)))
    elif task is not None:
        (one,) = tasks(grid, only=task)
        sys.stdout.write("".join(f"{word}\0" for word in (one.config, *one.overrides)))
    elif here:
        run_here(tasks(grid), jobs)
    else:
        for t in tasks(grid):
            print(f"{t.index:4d}  {t.run_name}  {t.config} {' '.join(t.overrides)}")


def run_here(found: list[Task], jobs: int = 1) -> None:
    """Run the tasks on this machine, ``jobs`` at a time, each as its own ``vegan-scale train`` process (its output
    in its run directory's train.log). A task whose run already finished is skipped; one that stopped continues.
    SIGTERM or SIGUSR1 to this process is passed to the running tasks, which stop after a checkpoint (75), and no
    new task starts. Raises a VeganError naming the tasks that did not finish, with the exit code of the first (69
    for one killed by a signal: the code of a process that died, where Popen's negative code is no exit code)."""
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least one task at a time")
    pending = []
    for task in found:
        status = task.run_dir.read_exit_status()
        if status is not None and status["code"] == ExitCode.OK:
            log.info("task %d (%s) finished before; skipped", task.index, task.run_name)
        else:
            pending.append(task)
    failed: list[tuple[Task, int]] = []
    running: list[tuple[Task, subprocess.Popen]] = []
    stopping: list[int] = []  # the signal that asked the sweep to stop, once one has

    def stop(signum: int, frame: object) -> None:
        stopping.append(signum)
        pending.clear()
        for _, proc in running:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                task = pending.pop(0)
                log.info("task %d: %s", task.index, task.run_name)
                command = [sys.executable, "-m", "vegan_scale", "train", task.config, *task.overrides, "--quiet"]
                running.append((task, proc := subprocess.Popen(command)))
                if stopping:  # the signal came while this task started, before the handler could see it
                    proc.send_signal(stopping[0])
            time.sleep(0.5)
            for task, proc in [(t, p) for t, p in running if p.poll() is not None]:
                running.remove((task, proc))
                if proc.returncode != ExitCode.OK:
                    failed.append((task, proc.returncode))
    except BaseException:  # Ctrl-C reached the tasks too: they stop after a checkpoint; wait for them
        for _, proc in running:
            proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        names = ", ".join(f"{t.index} ({t.run_name}, {_ending(code)})" for t, code in failed)
        error = VeganError(
            f"{len(failed)} of {len(found)} task(s) did not finish: {names}; run the sweep again to continue them"
        )
        error.exit_code = failed[0][1] if failed[0][1] > 0 else ExitCode.LOST_RANK
        raise error


def _ending(returncode: int) -> str:
    """How a task's process ended, for a person: its exit code, or the signal that killed it (Popen's negative
    code: SIGKILL is most often the out-of-memory killer), which the sweep reports as a process that died (69)."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"
