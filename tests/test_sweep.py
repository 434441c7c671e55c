"""Sweeps from a grid file: the tasks (order, run names, tags, validation before anything runs) and running them on
this machine, two at a time, with finished tasks skipped on a second run. The SLURM job array is tested on the
one-node cluster (tests/slurm/test_sbatch_requeue.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.paths import ROOT
from tests.runkit import env, exit_status, finish, start, train_args, wait_for_step
from tests.test_config import alias_bomb
from vegan_scale import sweep
from vegan_scale.errors import ConfigError, ExitCode, VeganError
from vegan_scale.rundir import RunDir

pytestmark = pytest.mark.distributed


def _grid(tmp_path: Path, **spec) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_tasks_are_every_config_and_combination_in_order(tmp_path: Path) -> None:
    configs = [str(ROOT / "configs/mnist/wae_mmd.yaml"), str(ROOT / "configs/mnist/wae_gan.yaml")]
    grid = _grid(tmp_path, name="g", configs=configs, grid={"run.seed": [0, 1], "penalty.weight": [1, 10]})
    found = sweep.tasks(grid)
    assert [t.run_name for t in found[:3]] == [
        "g-wae_mmd-seed0-weight1",
        "g-wae_mmd-seed0-weight10",
        "g-wae_mmd-seed1-weight1",
    ]
    assert [t.index for t in found] == list(range(8)) and found[4].run_name == "g-wae_gan-seed0-weight1"
    assert found[5].overrides[-2:] == ("tracking.tags.sweep=g", "tracking.tags.sweep_task=5")
    lists = sweep.tasks(_grid(tmp_path, name="h", configs=configs[:1], grid={"model.mlp.hidden": [[256], [512, 512]]}))
    assert [t.run_name for t in lists] == ["h-wae_mmd-hidden256", "h-wae_mmd-hidden512_512"]
    assert lists[1].overrides[0] == "model.mlp.hidden=[512, 512]"


def test_grid_values_of_text_keys_keep_the_text_as_written(tmp_path: Path) -> None:
    """A grid over a key that holds text, written plainly: YAML read 010 and 0x8 as the number 8, so both tasks
    trained as experiment 8, under one run directory's parent."""
    grid = tmp_path / "grid.yaml"
    config = ROOT / "configs/mnist/wae_mmd.yaml"
    grid.write_text(f"name: g\nconfigs: [{config}]\ngrid: {{run.experiment: [010, 0x8]}}\n")
    found = sweep.tasks(grid)
    assert [t.overrides[0] for t in found] == ["run.experiment='010'", "run.experiment='0x8'"]
    assert [t.run_dir.path.parent.name for t in found] == ["010", "0x8"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "g", "configs": ["configs/mnist/wae_mmd.yaml"], "grid": {"run.sed": [0]}}, "task 0 .*run.sed"),
        ({"name": "g", "configs": ["configs/mnist/wae_mmd.yaml"], "grid": {"run.seed": 3}}, "needs a list"),
        ({"name": "a b", "configs": ["configs/mnist/wae_mmd.yaml"]}, "name 'a b'"),
        ({"name": "g", "config": ["configs/mnist/wae_mmd.yaml"]}, "holds name, configs"),
        # fields of the wrong type, which ended in a TypeError or an AttributeError
        ({"name": "g", "configs": [5]}, "configs must be a list of experiment files"),
        ({"name": "g", "configs": [{"a": 1}]}, "configs must be a list of experiment files"),
        ({"name": "g", "configs": ["configs/mnist/wae_mmd.yaml"], "grid": {1: [1]}}, "grid a mapping of keys"),
        ({"name": "g", "configs": ["configs/mnist/wae_mmd.yaml"], "overrides": 5}, "overrides a list"),
        ({"name": "g", "configs": ["configs/mnist/wae_mmd.yaml"], "overrides": "train.epochs=20"}, "overrides a list"),
        ({"name": None, "configs": ["configs/mnist/wae_mmd.yaml"]}, "name None must be text"),
        # 10**10 tasks from 500 bytes: counted before any is made (it used to run until killed)
        (
            {
                "name": "g",
                "configs": ["configs/mnist/wae_mmd.yaml"],
                "grid": {f"k{i}": list(range(10)) for i in range(10)},
            },
            "makes 10,000,000,000 tasks",
        ),
        # keys the sweep sets itself, or one key set twice: the grid's values were silently replaced
        ({"name": "g", "configs": ["configs/mnist/wae_mmd.yaml"], "grid": {"run.name": ["a", "b"]}}, "run.name would"),
        (
            {"name": "g", "configs": ["configs/mnist/wae_mmd.yaml"], "overrides": ["tracking.tags.sweep=x"]},
            "tracking.tags.sweep would be set twice",
        ),
        (
            {
                "name": "g",
                "configs": ["configs/mnist/wae_mmd.yaml"],
                "grid": {"run.seed": [0, 1]},
                "overrides": ["run.seed=5"],
            },
            "run.seed would be set twice",
        ),
    ],
)
def test_a_bad_grid_is_refused_before_anything_runs(tmp_path: Path, spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        sweep.tasks(_grid(tmp_path, **spec))


def test_one_task_of_a_large_grid_is_given_without_loading_the_others(tmp_path: Path) -> None:
    """`sweep --task N` (every array task of sweep.sbatch) and `--count` loaded and checked every task of the grid
    first, about 0.1 s each: a 1,000-task array spent 100 s per task before training, minutes past 10,000. They now
    expand the grid and load the one task asked for (its errors still named)."""
    config = str(ROOT / "configs/mnist/wae_mmd.yaml")
    grid = _grid(tmp_path, name="big", configs=[config], grid={"run.seed": list(range(5000))})
    done = subprocess.run(
        [sys.executable, "-m", "vegan_scale", "sweep", str(grid), "--task", "4321"],
        capture_output=True, timeout=60, env=env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split(b"\0")[:2] == [config.encode(), b"run.seed=4321"]
    counted = subprocess.run(
        [sys.executable, "-m", "vegan_scale", "sweep", str(grid), "--count"], capture_output=True, timeout=60
    )
    assert counted.stdout.strip() == b"5000"
    bad = _grid(tmp_path, name="bad", configs=[config], grid={"train.max_steps": [10, -1]})
    assert [t.run_name for t in sweep.tasks(bad, only=0)] == ["bad-wae_mmd-max_steps10"]
    with pytest.raises(ConfigError, match=r"task 1 .*train\.max_steps=-1"):
        sweep.tasks(bad, only=1)


def test_an_alias_bomb_grid_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(f"name: g\nconfigs: [configs/mnist/wae_mmd.yaml]\n{alias_bomb('grid')}")  # 10**10 tasks
    with pytest.raises(ConfigError, match=r"grid.yaml: holds .* values with its aliases"):
        sweep.tasks(path)


def test_run_here_two_at_a_time_and_again(tiny_shards: Path, tmp_path: Path) -> None:
    """`vegan-scale sweep GRID --run --jobs 2` trains both tasks; run again, it skips them (both finished)."""
    common = [a for a in train_args(tiny_shards, tmp_path, "unused", "wae_mmd")[4:] if not a.startswith("run.name")]
    common += ["train.max_steps=6", "tracking.backend=none"]
    grid = _grid(tmp_path, name="here", configs=[str(ROOT / "configs/mnist/wae_mmd.yaml")], grid={"run.seed": [0, 1]},
                 overrides=common)  # fmt: skip
    command = [sys.executable, "-m", "vegan_scale", "sweep", str(grid), "--run", "--jobs", "2"]
    first = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    for seed in (0, 1):
        run_dir = tmp_path / "mnist" / f"here-wae_mmd-seed{seed}"
        assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 0
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["seed"] == seed
    again = subprocess.run(command, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    output = again.stdout + again.stderr
    assert again.returncode == 0 and output.count("finished before; skipped") == 2, output[-3000:]


def test_sigterm_to_the_sweep_stops_its_task_after_a_checkpoint(tiny_shards: Path, tmp_path: Path) -> None:
    """`kill PID` of `vegan-scale sweep --run` (the sweep alone, as a job's batch shell gets it): the running task
    checkpoints and stops with 75, the next one never starts, and the sweep exits with the task's code."""
    common = [a for a in train_args(tiny_shards, tmp_path, "unused", "wae_mmd")[4:] if not a.startswith("run.name")]
    common += ["train.max_steps=100000", "tracking.backend=none"]
    grid = _grid(tmp_path, name="stop", configs=[str(ROOT / "configs/mnist/wae_mmd.yaml")], grid={"run.seed": [0, 1]},
                 overrides=common)  # fmt: skip
    proc = start([sys.executable, "-m", "vegan_scale", "sweep", str(grid), "--run"])
    first = tmp_path / "mnist" / "stop-wae_mmd-seed0"
    wait_for_step(proc, first, 5)
    proc.send_signal(signal.SIGTERM)  # to the sweep process only
    code, out = finish(proc)
    assert code == 75, out[-3000:]
    status = exit_status(first)
    assert status["code"] == 75 and (first / "checkpoints" / f"step_{status['step']:08d}" / "COMPLETE").exists()
    assert not (tmp_path / "mnist" / "stop-wae_mmd-seed1").exists()


def test_a_stop_that_comes_while_a_task_starts_reaches_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM to the sweep while it started a task (between taking the task and keeping its process) reached the
    running tasks only: the new one trained to its end. It is passed on to the task once its process exists."""
    told: list[int] = []

    class Starting:  # a task process, during whose start the sweep is signalled
        returncode = 75

        def __init__(self, command: list[str]) -> None:
            signal.raise_signal(signal.SIGTERM)

        def send_signal(self, signum: int) -> None:
            told.append(signum)

        def poll(self) -> int:
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", Starting)
    task = sweep.Task(0, "configs/mnist/wae_mmd.yaml", (), RunDir(tmp_path / "run"))
    with pytest.raises(VeganError, match="did not finish"):
        sweep.run_here([task, task])
    assert told == [signal.SIGTERM]  # the task started, and only it: the second never started


def test_a_task_killed_by_a_signal_is_a_process_that_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's process killed by SIGKILL (the out-of-memory killer) has Popen's code -9: the sweep passed it on as
    its own exit status (247 to the shell, no documented code). It is named by its signal and the sweep exits 69.
    The task is a real process that kills itself."""
    real = subprocess.Popen
    suicide = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    monkeypatch.setattr(subprocess, "Popen", lambda command: real([sys.executable, "-c", suicide]))
    task = sweep.Task(0, "configs/mnist/wae_mmd.yaml", (), RunDir(tmp_path / "run"))
    with pytest.raises(VeganError, match=r"did not finish: 0 \(run, killed by SIGKILL\)") as raised:
        sweep.run_here([task])
    assert raised.value.exit_code == ExitCode.LOST_RANK == 69
