"""launch/slurm/*.sbatch on a real one-node SLURM cluster: a stop request mid-run, the checkpoint, the requeue under the
same job id, and a continuation that ends bit for bit where an uninterrupted run (no SLURM) ends.

Both styles run 2 CPU processes: train.sbatch one launcher per node (accelerate launch, GPUS_PER_NODE=2), the stop
sent to the batch shell only (`scancel --batch`, as `--signal=B:USR1@lead` does); train_srun_native.sbatch one task
per process, the stop sent to the tasks only (plain `scancel --signal`, as `--signal=USR1@lead` does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from safetensors.torch import load_file

from tests.paths import ROOT
from tests.runkit import MlflowServer, steps_logged

pytestmark = [pytest.mark.slurm, pytest.mark.distributed]

BIN = Path(sys.executable).parent
CONFIG = ROOT / "configs" / "mnist" / "wae_mmd.yaml"
STEPS, CHECKPOINT_EVERY, CHECK_EVERY = 150, 25, 5
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
CLUSTER = Path(__file__).resolve().parent / "cluster.sh"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster(action: str, directory: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(CLUSTER), action, str(directory)], env=env, capture_output=True, text=True, timeout=timeout
    )


# A session fixture in this module rather than a conftest.py: tests/ imports `conftest` by name, and a second
# conftest.py would shadow it.
@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """munged, slurmctld and slurmd running in a scratch directory; yields the environment for SLURM's clients
    (SLURM_CONF set, no SLURM_* variables of an enclosing job). Every job is cancelled and the daemons stopped at
    the end, whatever the tests did."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} not found): as root, "
            "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"
        )
    if os.geteuid() != 0:
        pytest.skip("the SLURM tests start slurmd, which must run as root (CI runs them as root)")
    # a short directory: munged's socket lives in it, and a unix socket path has at most 107 characters
    directory = Path(tempfile.mkdtemp(prefix="vs-slurm-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env |= {"SLURMCTLD_PORT": str(_free_port()), "SLURMD_PORT": str(_free_port())}
    try:
        started = _cluster("start", directory, env, timeout=60)
        if started.returncode != 0:
            pytest.fail(f"tests/slurm/cluster.sh start failed ({started.returncode}):\n{started.stderr[-4000:]}")
        yield {**env, "SLURM_CONF": str(directory / "etc" / "slurm.conf")}
    finally:
        stopped = _cluster("stop", directory, env, timeout=90)
        if stopped.returncode == 0:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            print(f"tests/slurm/cluster.sh stop failed; logs kept in {directory}:\n{stopped.stderr[-2000:]}")


@dataclass(frozen=True)
class Style:
    sbatch: tuple[str, ...]  # sbatch options besides the script's own
    scancel: tuple[str, ...]  # who gets the USR1
    stop_seen: str  # the log line that shows who received it


STYLES = {
    "train.sbatch": Style(("--nodes=1",), ("--batch",), "sbatch: SIGUSR1 received"),
    "train_srun_native.sbatch": Style(("--nodes=1", "--ntasks-per-node=2"), (), "| SIGUSR1: stopping after a"),
}


def _overrides(shards: Path, root: Path) -> list[str]:
    """A small deterministic run, long enough (about 6 s of steps; a stop takes effect within 0.2 s of `scancel`) for
    the stop to arrive mid-way."""
    return [
        f"data.train={shards / 'train'}",
        f"data.test={shards / 'test'}",
        f"run.root={root}",
        "model.network=mlp",
        "model.mlp.hidden=[512,512]",
        "train.global_batch_size=20",
        f"train.max_steps={STEPS}",
        "train.deterministic=true",
        f"train.check_every={CHECK_EVERY}",
        f"checkpoint.every_steps={CHECKPOINT_EVERY}",
        "tracking.backend=none",
        "tracking.log_every=10",
        "eval.every_steps=1000",
        "eval.num_samples=40",
        "eval.grid_size=2",
        "data.num_workers=0",
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import write_tiny_shards

    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The export of the same run, uninterrupted, without SLURM: 2 DDP processes under accelerate launch."""
    root = tmp_path_factory.mktemp("reference")
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launch/accelerate/cpu_ddp.yaml")]
    cmd += ["--main_process_port", str(_free_port()), "-m", "vegan_scale", "train", str(CONFIG)]
    cmd += [*_overrides(shards, root), "run.name=reference"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return root / "mnist" / "reference" / "export" / "model.safetensors"


def _job_env(cluster_env: dict[str, str]) -> dict[str, str]:
    """What sbatch passes to the job: PYTHON names this venv's interpreter, whose bin/ is NOT on PATH (the scripts
    start everything, accelerate's launcher included, through $PYTHON); 2 processes on the CPU, one thread each."""
    env = {k: v for k, v in cluster_env.items() if k not in ("RUN_NAME", "MASTER_PORT", "ACCELERATE_CONFIG")}
    path = os.pathsep.join(p for p in env.get("PATH", os.defpath).split(os.pathsep) if Path(p) != BIN)
    return env | {"PATH": path, "PYTHON": sys.executable, "GPUS_PER_NODE": "2", "OMP_NUM_THREADS": "1"}


def _slurm(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
    return proc.stdout


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
    return dict(re.findall(r"(\w+)=(\S*)", _slurm(env, "scontrol", "show", "job", "-o", job_id)))


def _wait(what: str, probe: Callable[[], T | None], timeout: float, log: Path) -> T:
    deadline = time.monotonic() + timeout
    while (value := probe()) is None or value is False:
        if time.monotonic() > deadline:
            tail = log.read_text()[-4000:] if log.exists() else "(no log yet)"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job log:\n{tail}")
        time.sleep(0.1)
    return value


def _status(run_dir: Path, code: int) -> dict | None:
    try:
        status = json.loads((run_dir / "exit_status.json").read_text())
    except (OSError, ValueError):
        return None
    return status if status["code"] == code else None


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@dataclass(frozen=True)
class Interruption:
    """How a test interrupts a running job: the command (job id appended), what the log shows before the stop, and
    whether the script requeues the job (after a stop request) or SLURM does (a preemption requeues itself)."""

    command: tuple[str, ...]
    seen: str
    script_requeues: bool


def _sbatch(env: dict[str, str], script: str, shards: Path, tmp_path: Path) -> tuple[str, Path, Path]:
    """Submits ``script`` for the small run; the job id, its run directory and its log."""
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    sbatch = ["sbatch", "--parsable", "--time=10", f"--output={logs}/%x-%j.out", *STYLES[script].sbatch]
    job_id = _slurm(env, *sbatch, f"launch/slurm/{script}", str(CONFIG), *_overrides(shards, root)).strip()
    return job_id, root / "mnist" / f"slurm-{job_id}", logs / f"vegan-scale-{job_id}.out"


def _interrupt(
    env: dict[str, str], job_id: str, run_dir: Path, log: Path, how: Interruption, restarts: int, past: int
) -> int:
    """Once the job has trained 5 steps past the checkpoint of step ``past`` (the first periodic one, or the previous
    stop's), interrupts it: the trainer checkpoints and stops with 75, and SLURM runs the job again
    (Restarts=``restarts``). The stop's step."""
    periodic = run_dir / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "COMPLETE"
    progressed = lambda: (past != CHECKPOINT_EVERY or periodic.exists()) and steps_logged(run_dir) >= past + 5  # noqa: E731
    _wait("a checkpoint and progress", progressed, 120, log)
    signalled = time.time()
    _slurm(env, *how.command, job_id)
    stop = lambda: s if (s := _status(run_dir, 75)) and s["step"] > past else None  # noqa: E731
    stopped = _wait("exit_status.json with code 75 after this stop", stop, 60, log)
    stopped_at = (run_dir / "exit_status.json").stat().st_mtime
    again = {"Restarts": str(restarts), "JobState": "RUNNING"}
    _wait("the requeued job to run", lambda: again.items() <= _job(env, job_id).items(), 90, log)
    print(f"stop {restarts} at step {stopped['step']}: exit_status.json written {stopped_at - signalled:.2f} s after")
    step = stopped["step"]
    assert past + 5 <= step < STEPS and step % CHECK_EVERY == 0, stopped
    return step


def _check_attempt(text: str, attempt: int, how: Interruption, step: int, run_dir: Path, job_id: str) -> None:
    """The log of attempt ``attempt`` (0, 1, ...): it saw the interruption, checkpointed at ``step``, stopped there
    without a trace of vegan_scale's code, and its job was requeued; the next attempt continued from that step."""
    before = text.partition(f"SLURM_RESTART_COUNT={attempt + 1}")[0].rpartition(f"SLURM_RESTART_COUNT={attempt}")[2]
    after = text.partition(f"SLURM_RESTART_COUNT={attempt + 1}")[2]
    saved = re.search(rf"checkpoints/step_{step:08d} written in ([0-9.]+) s", before)
    assert saved and how.seen in before[: saved.start()], before[-4000:]
    assert f"stopped at step {step} on a stop request" in before[saved.end() :], before[-4000:]
    assert not re.search(r'File ".*/vegan_scale/', before), before[-4000:]  # a launcher may trace its own signal
    assert (f"sbatch: requeueing job {job_id}" in before) == how.script_requeues, before[-4000:]
    assert f"continuing from {run_dir}/checkpoints/step_{step:08d} (step {step})" in after, after[-4000:]


def _run_interrupted(
    script: str, interruptions: list[Interruption], env: dict[str, str], shards: Path, reference: Path, tmp_path: Path
) -> None:
    """Runs ``script``'s job through ``interruptions`` in turn, then to the end: it completes after as many
    restarts, every attempt stopped and continued as it should, and the weights are the uninterrupted run's, bit
    for bit."""
    job_id, run_dir, log = _sbatch(env, script, shards, tmp_path)
    try:
        steps = [CHECKPOINT_EVERY]
        for restarts, how in enumerate(interruptions, 1):
            steps.append(_interrupt(env, job_id, run_dir, log, how, restarts, past=steps[-1]))
        job = _wait("the job to end", lambda: (j := _job(env, job_id))["JobState"] in TERMINAL and j, 120, log)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    text = log.read_text()
    restarts = str(len(interruptions))
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == restarts and job["ExitCode"] == "0:0", job
    assert _status(run_dir, 0) == {"code": 0, "reason": "finished", "step": STEPS}
    for attempt, (how, step) in enumerate(zip(interruptions, steps[1:], strict=True)):
        _check_attempt(text, attempt, how, step, run_dir, job_id)
    assert not (run_dir / "PREEMPT").exists()
    assert _same_weights(run_dir / "export" / "model.safetensors", reference)


# A stop request (USR1) as each script's style receives it, and SLURM's own preemption: `scontrol requeue`, as a
# preempting job or an operator does, sends SIGTERM to every process of the job (batch shell, launcher, ranks) and
# SIGKILL after KillWait (5 s here); the trainer must checkpoint and stop inside that grace time.
USR1 = {
    script: Interruption(("scancel", "--signal=USR1", *style.scancel), style.stop_seen, True)
    for script, style in STYLES.items()
}
PREEMPTED = Interruption(("scontrol", "requeue"), "SIGTERM", False)


@pytest.mark.timeout(300)
def test_train_sbatch_stopped_then_preempted_continues_exactly(
    slurm_cluster: dict[str, str], shards: Path, reference: Path, tmp_path: Path
) -> None:
    """train.sbatch (one launcher per node): USR1 to the batch shell mid-run -> the trainer checkpoints and stops
    with 75 -> the script requeues the job -> the same job (Restarts=1) continues from that checkpoint -> SLURM
    preempts it (SIGTERM to every process) -> it stops with 75 again and SLURM runs it again (Restarts=2) -> it
    finishes with the uninterrupted run's weights, bit for bit."""
    script = "train.sbatch"
    _run_interrupted(script, [USR1[script], PREEMPTED], _job_env(slurm_cluster), shards, reference, tmp_path)


@pytest.mark.timeout(300)
def test_train_srun_native_sbatch_stopped_continues_exactly(
    slurm_cluster: dict[str, str], shards: Path, reference: Path, tmp_path: Path
) -> None:
    """train_srun_native.sbatch (one task per process): USR1 to the tasks mid-run -> checkpoint, 75, requeue, and a
    continuation that finishes with the uninterrupted run's weights, bit for bit."""
    script = "train_srun_native.sbatch"
    _run_interrupted(script, [USR1[script]], _job_env(slurm_cluster), shards, reference, tmp_path)


@pytest.mark.timeout(300)
def test_a_sweep_runs_as_a_job_array(
    slurm_cluster: dict[str, str], shards: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    """launch/slurm/sweep.sbatch over a grid file of 2 seeds: one array task per run, each named after its grid
    point, both finished, and grouped in one MLflow experiment by the sweep's tags and the array's job id."""
    from mlflow.tracking import MlflowClient

    server = mlflow_server.start()
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    common = [o for o in _overrides(shards, root) if not o.startswith(("train.max_steps", "tracking.backend"))]
    common += ["train.max_steps=20", f"tracking.uri={server.uri}", "tracking.experiment=sweeps"]
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        json.dumps({"name": "t", "configs": [str(CONFIG)], "grid": {"run.seed": [0, 1]}, "overrides": common})
    )
    env = _job_env(slurm_cluster) | {"GPUS_PER_NODE": "1"}
    sbatch = ["sbatch", "--parsable", "--time=10", "--array=0-1", f"--output={logs}/%x-%A_%a.out"]
    job_id = _slurm(env, *sbatch, "launch/slurm/sweep.sbatch", str(grid)).strip()
    run_dirs = [root / "mnist" / f"t-wae_mmd-seed{seed}" for seed in (0, 1)]
    try:
        log = logs / f"vegan-sweep-{job_id}_1.out"
        _wait("both tasks to finish", lambda: all(_status(d, 0) for d in run_dirs), 240, log)
        client = MlflowClient(server.uri)
        experiment = client.get_experiment_by_name("sweeps").experiment_id
        runs = client.search_runs([experiment], "tags.sweep = 't'")
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    assert sorted((r.info.run_name, r.data.tags["sweep_task"], r.data.params["run.seed"]) for r in runs) == [
        ("t-wae_mmd-seed0", "0", "0"),
        ("t-wae_mmd-seed1", "1", "1"),
    ]
    assert {r.data.tags["slurm.array_job_id"] for r in runs} == {job_id}
