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
from tests.runkit import steps_logged

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


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", list(STYLES))
def test_stop_requeue_and_continue_exactly(
    script: str, slurm_cluster: dict[str, str], shards: Path, reference: Path, tmp_path: Path
) -> None:
    """USR1 mid-run -> the trainer checkpoints and stops with 75 -> the script requeues the job -> the same job
    (Restarts=1) continues from that checkpoint and finishes with the uninterrupted run's weights, bit for bit."""
    style, env = STYLES[script], _job_env(slurm_cluster)
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    sbatch = ["sbatch", "--parsable", "--time=10", f"--output={logs}/%x-%j.out", *style.sbatch]
    started = time.time()
    job_id = _slurm(env, *sbatch, f"launch/slurm/{script}", str(CONFIG), *_overrides(shards, root)).strip()
    run_dir, log = root / "mnist" / f"slurm-{job_id}", logs / f"vegan-scale-{job_id}.out"
    try:
        first = run_dir / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "COMPLETE"
        progressed = CHECKPOINT_EVERY + 5
        _wait("a checkpoint and progress", lambda: first.exists() and steps_logged(run_dir) >= progressed, 120, log)
        signalled = time.time()
        _slurm(env, "scancel", "--signal=USR1", *style.scancel, job_id)
        stopped = _wait("exit_status.json with code 75", lambda: _status(run_dir, 75), 60, log)
        stopped_at = (run_dir / "exit_status.json").stat().st_mtime
        again = {"Restarts": "1", "JobState": "RUNNING"}
        _wait("the requeued job to run", lambda: again.items() <= _job(env, job_id).items(), 60, log)
        running_again = time.time()
        job = _wait("the job to end", lambda: (j := _job(env, job_id))["JobState"] in TERMINAL and j, 120, log)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["ExitCode"] == "0:0", (job, text[-4000:])
    assert _status(run_dir, 0) == {"code": 0, "reason": "finished", "step": STEPS}

    step = stopped["step"]
    assert progressed < step < STEPS and step % CHECK_EVERY == 0, stopped
    before, _, after = text.partition("SLURM_RESTART_COUNT=1")
    assert "SLURM_RESTART_COUNT=0" in before and after, text[-4000:]
    saved = re.search(rf"checkpoints/step_{step:08d} written in ([0-9.]+) s", before)
    assert saved and style.stop_seen in before[: saved.start()], before[-4000:]
    assert f"stopped at step {step} on a stop request" in before[saved.end() :]
    assert f"sbatch: requeueing job {job_id}" in before
    assert f"continuing from {run_dir}/checkpoints/step_{step:08d} (step {step})" in after, after[-4000:]
    assert not (run_dir / "PREEMPT").exists()
    assert _same_weights(run_dir / "export" / "model.safetensors", reference)
    print(
        f"\n{script}: job {job_id} stopped at step {step}: exit_status.json 75 written {stopped_at - signalled:.2f} s "
        f"after scancel (checkpoint {saved.group(1)} s); running again {running_again - stopped_at:.1f} s later; "
        f"whole job {time.time() - started:.1f} s"
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", ["train.sbatch"])  # SIGTERM to every process: the same for both styles
def test_preempted_by_slurm_continues_exactly(
    script: str, slurm_cluster: dict[str, str], shards: Path, reference: Path, tmp_path: Path
) -> None:
    """Real preemption: `scontrol requeue` mid-run, as a preempting job or an operator does. SLURM sends SIGTERM to
    every process of the job (batch shell, launcher, ranks), then SIGKILL after KillWait (5 s here). The trainer
    checkpoints and stops with 75 inside the grace time; SLURM runs the job again, which continues from that
    checkpoint and ends with the uninterrupted run's weights, bit for bit."""
    style, env = STYLES[script], _job_env(slurm_cluster)
    root, logs = tmp_path / "runs", tmp_path / "logs"
    logs.mkdir()
    sbatch = ["sbatch", "--parsable", "--time=10", f"--output={logs}/%x-%j.out", *style.sbatch]
    job_id = _slurm(env, *sbatch, f"launch/slurm/{script}", str(CONFIG), *_overrides(shards, root)).strip()
    run_dir, log = root / "mnist" / f"slurm-{job_id}", logs / f"vegan-scale-{job_id}.out"
    try:
        first = run_dir / "checkpoints" / f"step_{CHECKPOINT_EVERY:08d}" / "COMPLETE"
        progressed = CHECKPOINT_EVERY + 5
        _wait("a checkpoint and progress", lambda: first.exists() and steps_logged(run_dir) >= progressed, 120, log)
        _slurm(env, "scontrol", "requeue", job_id)
        stopped = _wait("exit_status.json with code 75", lambda: _status(run_dir, 75), 60, log)
        again = {"Restarts": "1", "JobState": "RUNNING"}
        _wait("the requeued job to run", lambda: again.items() <= _job(env, job_id).items(), 90, log)
        job = _wait("the job to end", lambda: (j := _job(env, job_id))["JobState"] in TERMINAL and j, 120, log)
    finally:
        subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1", (job, text[-4000:])
    assert _status(run_dir, 0) == {"code": 0, "reason": "finished", "step": STEPS}
    step = stopped["step"]
    before, _, after = text.partition("SLURM_RESTART_COUNT=1")
    assert "SIGTERM" in before and f"checkpoints/step_{step:08d} written" in before, before[-4000:]
    assert not re.search(r'File ".*/vegan_scale/', before), before[-4000:]  # a launcher may trace its own signal
    assert f"continuing from {run_dir}/checkpoints/step_{step:08d} (step {step})" in after, after[-4000:]
    assert _same_weights(run_dir / "export" / "model.safetensors", reference)


@pytest.mark.timeout(300)
def test_a_sweep_runs_as_a_job_array(slurm_cluster: dict[str, str], shards: Path, tmp_path: Path) -> None:
    """launch/slurm/sweep.sbatch over a grid file of 2 seeds: one array task per run, each named after its grid
    point, both finished, and grouped in one MLflow experiment by the sweep's tags and the array's job id."""
    from mlflow.tracking import MlflowClient

    from tests.test_tracking_outage import Server

    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server").start()
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
        server.stop()
    assert sorted((r.info.run_name, r.data.tags["sweep_task"], r.data.params["run.seed"]) for r in runs) == [
        ("t-wae_mmd-seed0", "0", "0"),
        ("t-wae_mmd-seed1", "1", "1"),
    ]
    assert {r.data.tags["slurm.array_job_id"] for r in runs} == {job_id}
