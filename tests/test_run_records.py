"""A run's own records as a kill or a power loss leaves them: metrics.jsonl gives every whole row back, nothing
else, and a continued run keeps the rows up to its checkpoint; a damaged exit_status.json reads as absent, with a
warning naming it (sync and sweeps go on); the run directory's lock, held for a process that is gone, is cleared
as the refusal says."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vegan_scale import metrics_log
from vegan_scale.rundir import RunDir

ROWS = [{"step": 1, "train/loss": 0.5}, {"step": 2, "train/loss": 0.25}, {"step": 3, "eval/recon": 7.0}]
DAMAGE = [
    b"\x00" * 40,  # a block the file system allocated but never wrote (power loss)
    bytes(range(128, 256)),  # garbage that is not UTF-8
    b"[" * 100_000,  # nesting deeper than Python's parser follows
    b'"step"',  # JSON, but not a row
    b'{"train/loss": 1.0}',  # a mapping without its step
]


def test_whole_rows_are_read_and_damage_is_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    log = metrics_log.MetricsLog(path)
    for row in ROWS[:2]:
        log.append(row["step"], {k: v for k, v in row.items() if k != "step"})
    log.close()
    with path.open("ab") as f:
        f.write(b"\n".join(DAMAGE) + b"\n" + b'{"step": 3, "eval/recon": 7.0}\n' + b'{"step": 4, "train/lo')
    assert metrics_log.read(path) == ROWS  # the torn last line (a kill mid-write) is left out too
    assert "damaged line(s) left out, their metrics lost" in caplog.text  # counted: a continuation drops them
    metrics_log.truncate(path, 2)  # a run continued from step 2's checkpoint
    assert metrics_log.read(path) == ROWS[:2]
    assert path.read_text() == '{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.25}\n'


@pytest.mark.parametrize("content", [bytes(range(200, 220)), b"../../../../etc\n", b"ABC\n"])
def test_a_damaged_mlflow_run_id_reads_as_absent(tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture):
    """Random bytes were a UnicodeDecodeError traceback in sync; a path was sent to the server as a run id."""
    run_dir = RunDir(tmp_path)
    run_dir.write_mlflow_run_id("0123456789abcdef0123456789abcdef")
    assert run_dir.read_mlflow_run_id() == "0123456789abcdef0123456789abcdef"
    run_dir.mlflow_run_id.write_bytes(content)
    assert run_dir.read_mlflow_run_id() is None and "mlflow_run_id is damaged" in caplog.text
    run_dir.mlflow_run_id.unlink()
    run_dir.mlflow_run_id.mkdir()
    assert run_dir.read_mlflow_run_id() is None


def test_a_damaged_exit_status_reads_as_absent(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir = RunDir(tmp_path)
    assert run_dir.read_exit_status() is None
    run_dir.write_exit_status(75, "stopped", 40)
    assert run_dir.read_exit_status() == {"code": 75, "reason": "stopped", "step": 40}
    for damage in DAMAGE:
        run_dir.exit_status.write_bytes(damage)
        with caplog.at_level(logging.WARNING, logger="vegan_scale.rundir"):
            assert run_dir.read_exit_status() is None
        assert f"{run_dir.exit_status} is damaged" in caplog.records[-1].getMessage()
    run_dir.exit_status.unlink()
    run_dir.exit_status.mkdir()  # a directory in its place was an IsADirectoryError in sync
    assert run_dir.read_exit_status() is None


def test_a_lock_left_by_a_process_that_is_gone_is_cleared_by_removing_its_file(tmp_path: Path) -> None:
    """A lock the file system keeps for a process on a failed node (NFSv3 can, until the node returns), stood for by
    a live process of another host's name: the run directory is refused naming that holder, and once the operator
    removes ranks/lock, as the refusal says, a new file takes a new lock."""
    run_dir = RunDir(tmp_path)
    run_dir.ranks.mkdir()
    run_dir.lock.write_text("process 4242 on node-17, since 2026-11-30 03:00:00\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir.lock)], stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert run_dir.take_lock() == (None, "process 4242 on node-17, since 2026-11-30 03:00:00")
        run_dir.lock.unlink()
        lock, refused_by = run_dir.take_lock()
        assert lock is not None and refused_by is None and f"process {os.getpid()} on" in run_dir.lock.read_text()
        lock.close()
    finally:
        holder.kill()
        holder.wait()


HOLD = """
import fcntl, sys
f = open(sys.argv[1], "a")
fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


def test_strangers_are_what_a_directory_without_a_run_holds_besides_a_run_s_entries(tmp_path: Path) -> None:
    """A batch script's PREEMPT and a run's own names (their temporary names too) are a run's; once a run has
    started, whatever its users keep beside it is theirs."""
    run_dir = RunDir(tmp_path / "run")
    assert run_dir.strangers() == []  # not there yet
    run_dir.path.mkdir()
    for name in ("PREEMPT", "config.yaml", "config.yaml.tmp", "train.log"):
        (run_dir.path / name).touch()
    assert run_dir.strangers() == []
    (run_dir.path / "notes.txt").touch()
    (run_dir.path / "data").mkdir()
    assert run_dir.strangers() == ["data", "notes.txt"]
    run_dir.ranks.mkdir()  # an attempt took the lock: a run's directory
    assert run_dir.strangers() == []


def test_two_runs_of_a_script_within_one_second_get_two_directories(tiny_shards: Path, tmp_path: Path) -> None:
    """Without run.name, a run is named by its settings and the second it started: a script's second run within
    that second (here the clock is held still) took the first run's directory, and with a longer train.max_steps
    silently continued it. The second is now a new run beside it, named with -2."""
    from tests.paths import ROOT
    from tests.runkit import env, train_args

    args = [a for a in train_args(tiny_shards, tmp_path, "unused")[3:] if not a.startswith("run.name=")]
    script = (
        "import sys, time, vegan_scale\n"
        "time.strftime = lambda *a: '20260101-000000'\n"
        "print('RUN', vegan_scale.train(sys.argv[1], [*sys.argv[2:], 'train.max_steps=4']))\n"
        "print('RUN', vegan_scale.train(sys.argv[1], [*sys.argv[2:], 'train.max_steps=6']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = (Path(line[4:]) for line in done.stdout.splitlines() if line.startswith("RUN "))
    assert first.name.endswith("-20260101-000000") and second.name == first.name + "-2"
    for run_dir, steps in ((first, 4), (second, 6)):
        trained = [row["step"] for row in metrics_log.read(run_dir / "metrics.jsonl") if "train/loss" in row]
        assert trained == list(range(1, steps + 1)), run_dir
