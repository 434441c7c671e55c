"""Signals as clusters deliver them, with real processes: SIGTERM (SIGUSR1, SIGINT) sent to every process of a job,
loader workers included, as SLURM, `scancel` and launchers do, at any moment from start-up on. The run stops like a
requested stop: every rank agrees, one checkpoint, exit 75 (130 for Ctrl-C), exit_status.json says so, and no
traceback; the continuation ends where an uninterrupted run ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from tests.paths import ROOT
from tests.runkit import (
    ddp,
    env,
    exit_status,
    finish,
    free_port,
    local_mlflow,
    losses,
    metric_rows,
    processes,
    rank_process,
    run,
    same_weights,
    single,
    start,
    steps_logged,
    train_args,
    two_ranks,
    wait_for_step,
    wait_until,
)
from vegan_scale.atomic import TMP_SUFFIX

pytestmark = pytest.mark.distributed

WORKERS = "data.num_workers=2"  # loader worker processes in the group too


@pytest.fixture(scope="module")
def with_workers(tiny_shards_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export of an uninterrupted run of the runkit's configuration read by two loader workers."""
    root = tmp_path_factory.mktemp("workers")
    proc = run(single(train_args(tiny_shards_module, root, "full", "wae_gan", WORKERS)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "mnist" / "full" / "export" / "model.safetensors"


def _stopped_cleanly(code: int, out: str, run_dir: Path, expected: int) -> dict:
    """The checks every stop shares: the exit code, no traceback, and exit_status.json with a checkpoint of its
    step (when a step was trained) and none after it."""
    assert code == expected, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == expected, status
    steps = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert not steps or steps[-1] == status["step"], (steps, status)
    return status


EPOCH = 25  # steps in an epoch of the runkit's configuration (500 samples, global batch 20)


@pytest.mark.parametrize(
    ("sig", "expected", "at"),
    [("SIGTERM", 75, 7), ("SIGUSR1", 75, EPOCH + 2), ("SIGQUIT", 75, 7), ("SIGINT", 130, 7)],
)
def test_signal_to_the_whole_process_group(
    sig: str, expected: int, at: int, tiny_shards_module: Path, with_workers: Path, tmp_path: Path
) -> None:
    """`kill -<sig> -- -PGID` mid-run reaches the trainer and its two loader workers: the workers leave the stop to
    the trainer, which checkpoints at its next check; the continuation is bit for bit the uninterrupted run, and
    metrics.jsonl holds the loss of every step once, as the uninterrupted run's (the stopped step's included). Sent
    in the first epoch, or in the second, to workers that have read on from one epoch into the next."""
    run_dir = tmp_path / "mnist" / "group"
    args = train_args(tiny_shards_module, tmp_path, "group", "wae_gan", WORKERS)
    proc = start(single(args))  # its own session: the process group of a job
    wait_for_step(proc, run_dir, at)
    os.killpg(proc.pid, getattr(signal, sig))
    status = _stopped_cleanly(*finish(proc), run_dir, expected)
    assert at <= status["step"] < 40
    assert not _group_members(proc.pid)  # the loader workers ended with their trainer, none left behind
    again = run(single(args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert same_weights(run_dir / "export" / "model.safetensors", with_workers)
    steps = [[step for step, _ in metric_rows(d)] for d in (run_dir, with_workers.parents[1])]
    assert steps[0] == steps[1] == list(range(1, 41))  # every step once, in order
    assert losses(run_dir) == losses(with_workers.parents[1])


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_stop_during_a_checkpoint_ends_the_run_on_that_checkpoint(
    ranks: int, tiny_shards_module: Path, tmp_path: Path
) -> None:
    """SIGTERM to every process of the job (each rank's process group, loader workers included, as srun delivers it)
    while a periodic checkpoint is being written (its step_00000004 directory still under its temporary name): the
    run ends right after that checkpoint, on it. It used to train on to its next check (here the next checkpoint,
    step 8) and write another: twice the time a stop needs within a scheduler's grace. The networks are wide (2048
    units, about 150 MB with the optimizer's moments) so that the write takes a while."""
    run_dir = tmp_path / "mnist" / "saving"
    wide = ["model.mlp.hidden=[2048,2048]", "checkpoint.every_steps=4", "train.check_every=1000", WORKERS]
    args = train_args(tiny_shards_module, tmp_path, "saving", "wae_mmd", *wide)
    procs = [start(single(args))] if ranks == 1 else two_ranks(args)
    writing = run_dir / "checkpoints" / f"step_00000004{TMP_SUFFIX}"
    wait_until("the first checkpoint's writing", writing.exists, procs[0], every=0.001)
    for proc in procs:
        os.killpg(proc.pid, signal.SIGTERM)
    ended = [finish(proc) for proc in procs]
    status = _stopped_cleanly(*ended[0], run_dir, 75)
    assert all(code == 75 for code, _ in ended), [out[-3000:] for _, out in ended]
    assert status["step"] == 4, status
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000004"]
    assert [step for step, _ in metric_rows(run_dir)] == [1, 2, 3, 4]


def test_a_second_ctrl_c_interrupts_at_once(tiny_shards_module: Path, with_workers: Path, tmp_path: Path) -> None:
    """Ctrl-C twice (SIGINT to the group, the second before the run reached its next check): the run stops at once,
    wherever it was, with exit 130 and no checkpoint of its own; its loader workers end with it, and the continuation
    from the last complete checkpoint is bit for bit the uninterrupted run."""
    run_dir = tmp_path / "mnist" / "twice"
    args = train_args(tiny_shards_module, tmp_path, "twice", "wae_gan", WORKERS, "train.check_every=20")
    args += ["checkpoint.every_steps=20"]  # checks at steps 20 and 40 only: the second Ctrl-C comes between
    proc = start(single(args))
    wait_for_step(proc, run_dir, 22)
    os.killpg(proc.pid, signal.SIGINT)
    acknowledged = lambda: "Ctrl-C: stopping" in (run_dir / "train.log").read_text()  # noqa: E731
    wait_until("the first Ctrl-C's acknowledgement", acknowledged, proc, timeout=30, every=0.002)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finish(proc)
    assert code == 130 and "Traceback" not in out, out[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == 130 and "second Ctrl-C" in status["reason"] and 22 <= status["step"] < 40, status
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000020"]
    assert not _group_members(proc.pid)
    again = run(single(args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert same_weights(run_dir / "export" / "model.safetensors", with_workers)


def test_sigterm_to_every_process_under_accelerate_launch(tiny_shards_module: Path, tmp_path: Path) -> None:
    """`accelerate launch` with 2 processes, each with a loader worker: SIGTERM to the launcher, the ranks and the
    workers, in the second epoch (the workers read on from one epoch into the next). Both ranks agree on one step,
    the checkpoint is written, exit_status.json says 75 (the launcher's own code is its business) and the MLflow
    run KILLED; the run then continues to the end, and MLflow shows it FINISHED with the loss of every step once."""
    run_dir = tmp_path / "mnist" / "launched"
    args = train_args(
        tiny_shards_module, tmp_path, "launched", "wae_mmd", "data.num_workers=1", "tracking.backend=mlflow"
    )
    proc = start(ddp(args))
    wait_for_step(proc, run_dir, EPOCH + 2)
    os.killpg(proc.pid, signal.SIGTERM)
    _, out = finish(proc)
    status = exit_status(run_dir)
    assert status["code"] == 75 and EPOCH + 2 <= status["step"] < 40, (status, out[-3000:])
    assert (run_dir / "checkpoints" / f"step_{status['step']:08d}" / "COMPLETE").exists()
    assert not re.search(r'File ".*/vegan_scale/', out), out[-3000:]  # the launcher may trace its own signal
    assert _mlflow_status(run_dir) == "KILLED"
    again = run(ddp(args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert exit_status(run_dir)["code"] == 0 and _mlflow_status(run_dir) == "FINISHED"
    client, run_id = local_mlflow(run_dir)
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(1, 41))


def _mlflow_status(run_dir: Path) -> str:
    """The status of the run in its local MLflow store."""
    client, run_id = local_mlflow(run_dir)
    return client.get_run(run_id).info.status


def _group_members(pgid: int) -> list[int]:
    """The processes still in process group ``pgid``."""
    return [pid for pid, fields in processes().items() if int(fields[2]) == pgid]


def _catches(pid: int, sig: signal.Signals) -> bool:
    """Whether the process has a handler for ``sig`` (from /proc: SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize(
    ("sig", "expected", "after"),
    [("SIGTERM", 75, 0.0), ("SIGTERM", 75, 1.5), ("SIGINT", 130, 0.0)],
    ids=["SIGTERM-at-once", "SIGTERM-while-building", "SIGINT-at-once"],
)
def test_signal_during_start_up(
    sig: str, expected: int, after: float, tiny_shards_module: Path, tmp_path: Path
) -> None:
    """A signal to the group while the run starts (as soon as the process listens, before torch is even imported;
    or while it builds): it still ends with its code and exit status and no traceback, without training."""
    run_dir = tmp_path / "mnist" / "early"
    proc = start(single(train_args(tiny_shards_module, tmp_path, "early", "wae_gan", WORKERS)))
    wait_until("the trainer's signal handlers", lambda: _catches(proc.pid, signal.SIGTERM), proc, 30, every=0.005)
    time.sleep(after)
    os.killpg(proc.pid, getattr(signal, sig))
    status = _stopped_cleanly(*finish(proc), run_dir, expected)
    assert status["step"] < 5


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_a_stop_while_waiting_for_the_other_processes_ends_at_once(tiny_shards_module: Path, tmp_path: Path) -> None:
    """The first process of a two-process job whose other process never comes, waiting in torch's rendezvous (native
    code, where Python's signal handlers do not run), signalled as SLURM and Ctrl-C do: it ends at once with the
    stop's code and one line, not after the 300 s timeout (nor after a second Ctrl-C, which would not be heard)."""
    ports, procs = {}, {}
    for sig in ("SIGTERM", "SIGINT"):
        ports[sig] = free_port()
        args = train_args(tiny_shards_module, tmp_path, f"waiting-{sig}", "wae_gan", "train.collective_timeout_s=300")
        procs[sig] = rank_process(args, 0, 2, ports[sig])
    try:
        for sig, proc in procs.items():
            wait_until("the rendezvous", lambda port=ports[sig]: _listening(port), proc, 120)
            os.killpg(proc.pid, getattr(signal, sig))
        ended = {sig: finish(proc, timeout=60) for sig, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.kill()
    for sig, expected in (("SIGTERM", 75), ("SIGINT", 130)):
        code, out = ended[sig]
        assert code == expected, out[-3000:]
        assert f"error: stopped on {sig} while waiting for the other processes of the job at 127.0.0.1:" in out, out
        assert "Traceback" not in out, out[-3000:]


def _in_a_terminal(args: list[str]) -> tuple[subprocess.Popen, int, list[bytes]]:
    """The trainer in a session of its own whose controlling terminal is a new pseudo-terminal (as in an SSH
    session): the process, the terminal's master side, and what the terminal shows (read by a thread, so that the
    trainer never waits for a reader)."""
    master, terminal = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        env=env(),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
    )
    os.close(terminal)
    shown: list[bytes] = []

    def read() -> None:
        with contextlib.suppress(OSError):  # EIO once the trainer's side is closed
            while chunk := os.read(master, 65536):
                shown.append(chunk)

    threading.Thread(target=read, daemon=True).start()
    return proc, master, shown


def test_the_terminal_closing_stops_after_a_checkpoint(
    tiny_shards_module: Path, with_workers: Path, tmp_path: Path
) -> None:
    """The terminal of an interactive run closes (an SSH session drops) mid-run: the kernel sends SIGHUP to the
    trainer and its loader workers, and every later write to the terminal fails. The run stops as on SIGTERM, as
    torchrun treats SIGHUP (the workers leave it to the trainer; a checkpoint, exit 75, its exit status), the
    console going to /dev/null; the continuation ends where the uninterrupted run ends. Before, SIGHUP killed it
    at once and lost every step since its last checkpoint."""
    run_dir = tmp_path / "mnist" / "hangup"
    args = train_args(tiny_shards_module, tmp_path, "hangup", "wae_gan", WORKERS)
    proc, master, shown = _in_a_terminal(args)
    try:
        deadline = time.monotonic() + 120
        while steps_logged(run_dir) < 7 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, b"".join(shown)[-3000:]
        os.close(master)  # the terminal closes: SIGHUP
        code = proc.wait(timeout=120)
    finally:  # a failed test leaves nothing running
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (run_dir / "train.log").read_text()
    assert code == 75, log[-3000:]
    assert "SIGHUP: stopping after a checkpoint" in log and "Traceback" not in log, log[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == 75 and 7 <= status["step"] < 40, status
    assert (run_dir / "checkpoints" / f"step_{status['step']:08d}").is_dir()
    assert not _group_members(proc.pid)  # the loader workers ended with their trainer
    again = run(single(args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert same_weights(run_dir / "export" / "model.safetensors", with_workers)
    assert losses(run_dir) == losses(with_workers.parents[1])
