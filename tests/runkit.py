"""Helpers for tests that run training as real processes: commands, waiting for steps, comparing results."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file

from tests.paths import ROOT

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": str(ROOT / ".data" / "torch_extensions"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


def train_args(shards: Path, root: Path, name: str, recipe: str = "wae_gan", *extra: str) -> list[str]:
    """A small deterministic run: MLP on tiny shards, a checkpoint every 5 steps, checks every 2. Not tracked
    (``tracking.backend=mlflow`` in ``extra`` turns MLflow on): importing MLflow and creating a fresh store's
    tables add 4 s to every process start, and most tests read the run directory. The encoder's pre-training is
    kept, shortened (the recipes' 200 steps took 1-2 s of every new run)."""
    return [
        "-m",
        "vegan_scale",
        "train",
        str(ROOT / f"configs/mnist/{recipe}.yaml"),
        f"data.train={shards / 'train'}",
        f"data.test={shards / 'test'}",
        f"run.root={root}",
        f"run.name={name}",
        "model.network=mlp",
        "model.mlp.hidden=[32]",
        "train.global_batch_size=20",
        "train.max_steps=40",
        "train.deterministic=true",
        "train.encoder_pretrain_steps=20",
        "train.check_every=2",
        "tracking.backend=none",
        "tracking.log_every=1",
        "eval.every_steps=20",
        "eval.num_samples=40",
        "eval.grid_size=2",
        "checkpoint.every_steps=5",
        "checkpoint.keep_last_k=20",
        "data.num_workers=0",
        *extra,
    ]


def single(args: list[str]) -> list[str]:
    return [sys.executable, *args]


def ddp(args: list[str], config: str = "cpu_ddp.yaml", processes: int | None = None) -> list[str]:
    """``args`` under ``accelerate launch`` with a launch config (and, given, another number of processes)."""
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(ROOT / "launch/accelerate" / config),
        *(["--num_processes", str(processes)] if processes else []),
        "--main_process_port",
        str(free_port()),
        *args,
    ]


def namespaces_available() -> bool:
    """Whether ``unshare -rm`` works here: a private mount namespace, no privileges needed, nothing left mounted."""
    unshare = shutil.which("unshare")
    return unshare is not None and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(
    not namespaces_available(), reason="unshare -rm (user and mount namespaces) is not permitted"
)


def permissions_held() -> list[str]:
    """A command prefix under which file permissions hold, for root too (the capabilities that override them
    dropped, as setpriv does); none for another user, whom they bind already."""
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"] if os.geteuid() == 0 else []


def read_only(path: Path) -> list[str]:
    """A command prefix: what follows runs with ``path`` mounted read-only (in a namespace of its own)."""
    return ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(path)]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """Run to the end; past ``timeout`` the whole process group (a launcher and every process it started) is
    killed, so that a hung test leaves nothing running behind it."""
    proc = start(cmd, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, out, err) from None
    except BaseException:  # an interrupted test session takes its processes with it
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(cmd: list[str], stderr: int = subprocess.STDOUT) -> subprocess.Popen:
    """A training process in its own process group (so that a launcher and its workers can be killed together)."""
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )


def two_ranks(args: list[str]) -> list[subprocess.Popen]:
    """Two processes of a job started without a launcher (as srun starts them), each in its own process group."""
    port = free_port()
    return [rank_process(args, rank, 2, port) for rank in (0, 1)]


def rank_process(args: list[str], rank: int, world: int, port: int, cwd: Path = ROOT) -> subprocess.Popen:
    """Process ``rank`` of a job of ``world`` processes meeting at 127.0.0.1:``port``, started without a launcher
    (as srun starts them: the rank in the environment), in its own process group, in directory ``cwd``."""
    rank_env = {
        **env(),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "ACCELERATE_USE_CPU": "true",
    }
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        env=rank_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def processes() -> dict[int, list[str]]:
    """Every process of the machine: its /proc stat fields after the name (state, parent pid, process group, ...)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            found[int(stat.parent.name)] = stat.read_text().rpartition(")")[2].split()
        except OSError:  # ended meanwhile
            continue
    return found


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines()[:-1] if '"train/loss"' in line]
    return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    wait_until(f"step {step}", lambda: steps_logged(run_dir) >= step, proc, timeout)


def wait_until(
    what: str, condition: Callable[[], object], proc: subprocess.Popen, timeout: float = 300, every: float = 0.05
) -> None:
    """Poll ``condition`` every ``every`` seconds until it holds; fails naming ``what`` when training ended first
    (with its output) or past ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (code {proc.returncode}) before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(every)


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)


def outputs(procs: list[subprocess.Popen], timeout: float = 120) -> list[str]:
    """The output of each process once all have ended; a process still running after ``timeout`` is killed (with
    every other left running), so that a failed test leaves nothing behind."""
    try:
        return [proc.communicate(timeout=timeout)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def exit_status(run_dir: Path) -> dict:
    return json.loads((run_dir / "exit_status.json").read_text())


def metric_rows(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    """(step, value) of each row of metrics.jsonl that holds the training loss (or metric ``key``), in order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row[key]) for row in rows if key in row]


def losses(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """The training loss (or metric ``key``) at each step, as the run wrote it down in metrics.jsonl."""
    return dict(metric_rows(run_dir, key))


def local_mlflow(run_dir: Path) -> tuple[MlflowClient, str]:
    """A client of the MLflow store a run tracked into by default (``mlflow.db`` in its ``run.root``), and the id of
    the run's MLflow run."""
    from mlflow.tracking import MlflowClient

    store = run_dir.parents[1] / "mlflow.db"
    return MlflowClient(f"sqlite:///{store}"), (run_dir / "mlflow_run_id").read_text().strip()


def same_weights(a: Path, b: Path) -> bool:
    """Whether two exports (or checkpoint weight files) hold bit-identical tensors."""
    wa, wb = load_file(a), load_file(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


MLFLOW = str(Path(sys.executable).parent / "mlflow")


class MlflowServer:
    """`mlflow server` with one worker on a sqlite store; stop() and start() again keep the store and the port, and
    start() on a running server leaves it as it is."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MlflowServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [
            MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.root / "artifacts"),
        ]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2):
                    return self
            except OSError:
                time.sleep(0.2)
        raise AssertionError("mlflow server did not start within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)

    def steps(self, run_dir: Path, key: str = "train/loss") -> list[int]:
        from mlflow.tracking import MlflowClient

        history = MlflowClient(self.uri).get_metric_history((run_dir / "mlflow_run_id").read_text().strip(), key)
        return sorted(m.step for m in history)


class HoldsWrites:
    """A server that answers MLflow's health check and holds every write unanswered (a server whose database is
    locked for writing, by a migration or a backup): each read of the API is answered that its object does not
    exist. ``reads=False`` holds reads too (a database out of reach; a proxy that lets the health check through).
    ``asked`` is set at the first request held."""

    def __init__(self, reads: bool = True) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        released, self.asked = threading.Event(), threading.Event()
        asked = self.asked

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/health":
                    self._answer(200, b"OK")
                elif reads:
                    self._answer(404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "none such"}')
                else:
                    self.do_POST()

            def do_POST(self) -> None:
                asked.set()
                released.wait()

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._released = released
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> HoldsWrites:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
