"""The CPU launch modes of launch/ started for real: two simulated nodes under `accelerate launch`, ranks started as
srun starts them, and what every process refuses at start (a batch the world cannot divide, processes that never
meet, differ or do not share a run directory). DDP, ZeRO-2 and ZeRO-3 on one node run in test_elastic's chains."""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import ROOT
from tests.runkit import (
    ACCELERATE,
    MlflowServer,
    ddp,
    env,
    free_port,
    outputs,
    rank_process,
    run,
    train_args,
    two_ranks,
)
from vegan_scale.distributed.accelerator import build_accelerator
from vegan_scale.errors import ConfigError

pytestmark = pytest.mark.distributed


# One short run per launch mode: the runkit's small run, 6 steps, untracked, a checkpoint at the end.
SHORT = (
    "train.max_steps=6",
    "train.deterministic=false",
    "tracking.backend=none",
    "tracking.log_every=3",
    "eval.every_steps=6",
    "checkpoint.every_steps=6",
)


def _train_args(shards: Path, root: Path, recipe: str, *extra: str) -> list[str]:
    return train_args(shards, root, "launch", recipe, *SHORT, *extra)


def _launch(config: str, shards: Path, root: Path, recipe: str, *extra: str) -> subprocess.CompletedProcess:
    return run(ddp(_train_args(shards, root, recipe, *extra), config))


def test_global_batch_the_world_cannot_divide_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    """A global batch of 21 over 2 processes stops every process with the numbers (exit code 2 in each worker)."""
    proc = _launch("cpu_ddp.yaml", tiny_shards, tmp_path, "wae_mmd", "train.global_batch_size=21")
    assert proc.returncode != 0
    assert "train.global_batch_size=21 cannot be split evenly over 2 processes" in proc.stderr


def test_gradient_compression_under_deepspeed_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    """train.grad_compression is DDP's: under DeepSpeed (which reduces gradients itself) every process stops with
    the key named, before any data is read."""
    proc = _launch("cpu_zero2.yaml", tiny_shards, tmp_path, "wae_mmd", "train.grad_compression=bf16")
    assert proc.returncode != 0
    assert "train.grad_compression=bf16 is for DDP" in proc.stderr
    assert not re.search(r'File ".*/vegan_scale/', proc.stderr)  # the launcher traces its failed workers, not ours


def test_bf16_weights_copy_under_deepspeed_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.low_precision_weights is for one process or DDP: asked for under DeepSpeed (whose bf16 mode keeps its
    own bf16 weights and float32 masters), the Accelerator is not built and the key is named."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match=r"train\.low_precision_weights=true is for one process or DDP"):
        build_accelerator("bf16", low_precision_weights=True)


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(), reason="x86 Linux CPUs")
def test_emulated_bf16_is_named(caplog: pytest.LogCaptureFixture) -> None:
    """bf16 asked for on a CPU without bf16 instructions (AVX-512 BF16 or AMX, as the kernel lists the CPU's
    flags) is named once, with the setting that makes the run faster; float32 runs, and bf16 on a CPU with those
    instructions, are not warned about. Which of the two this machine shows depends on its CPU."""
    flags = set(re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)[1].split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    with caplog.at_level(logging.WARNING, logger="vegan_scale"):
        build_accelerator("no")
        assert not caplog.records
        build_accelerator("bf16")
    named = [r.getMessage() for r in caplog.records if "train.mixed_precision=bf16" in r.getMessage()]
    assert len(named) == (0 if native else 1), named
    assert native or "set train.mixed_precision=no" in named[0]


def test_simulated_two_nodes(tiny_shards: Path, tmp_path: Path, mlflow_server: MlflowServer) -> None:
    """Two 'machines' of one process each on 127.0.0.1 (launch/accelerate/ddp_multinode.yaml, c10d rendezvous),
    tracked by an MLflow server with system metrics on: each node's metrics are in the run, labelled by node."""
    from mlflow.tracking import MlflowClient

    server = mlflow_server.start()
    tracked = ("tracking.backend=mlflow", f"tracking.uri={server.uri}", "tracking.system_metrics=true")
    port = free_port()
    procs = []
    for machine in (0, 1):
        cmd = [
            ACCELERATE,
            "launch",
            "--config_file",
            str(ROOT / "launch/accelerate/ddp_multinode.yaml"),
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(machine),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            *_train_args(tiny_shards, tmp_path, "wae_mmd", *tracked),
        ]
        sampling = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "0.2"}
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env() | sampling, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    ended = outputs(procs, timeout=600)
    for p, out in zip(procs, ended, strict=True):
        assert p.returncode == 0, out[-4000:]
    assert "2 process(es) (MULTI_CPU)" in ended[0]
    run_dir = tmp_path / "mnist" / "launch"
    assert json.loads((run_dir / "exit_status.json").read_text())["code"] == 0
    run = MlflowClient(server.uri).get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.data.tags["dist.nodes"] == "2"
    for node in ("node0", "node1"):
        assert f"system/{node}/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)


def _ranks_ending(mode: str) -> list[tuple[int, str]]:
    """(exit status, output) of each of two ranks of tests/multiproc/teardown.py, started without a launcher."""
    procs = two_ranks([str(ROOT / "tests/multiproc/teardown.py"), mode])
    ended = outputs(procs)  # a rank that never ends (a Python whose teardown makes such a thread wait) is killed
    return [(proc.returncode, output) for proc, output in zip(procs, ended, strict=True)]


def test_a_process_ends_cleanly_while_a_gloo_thread_still_releases_a_collective() -> None:
    """vegan_scale.process_exit.leave ends a rank whose gloo worker thread is still releasing the tensors of a
    collective when the process ends (seen under ZeRO-3 on a busy machine) with its exit code; the interpreter's own
    exit, the control, is killed by a signal then (SIGABRT, 'terminate called without an active exception', or
    SIGSEGV)."""
    assert [code for code, _ in _ranks_ending("leave")] == [0, 0]
    control = _ranks_ending("teardown")
    assert all("finished" in output for _, output in control)  # both ranks got as far as their end
    assert any(code < 0 for code, _ in control), f"the interpreter's exit no longer crashes here: {control}"


SAY = """
import sys, time
from vegan_scale import logs
start, name, mode = float(sys.argv[1]), sys.argv[2], sys.argv[3]
while time.time() < start:
    pass
for i in range(5000):
    line = f"error: {name} {i} " + name * 100
    logs.say(line) if mode == "say" else print(line, file=sys.stderr)
"""


def _lines_of_two_processes(mode: str) -> list[str]:
    """The stderr lines two processes wrote at the same moment into one pipe, as the ranks of a job share theirs."""
    read, write = os.pipe()
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", SAY, str(start), name, mode], stderr=write) for name in "ab"]
    os.close(write)
    with os.fdopen(read) as stream:
        lines = stream.read().splitlines()
    assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    return lines


def test_lines_of_processes_sharing_stderr_stay_whole() -> None:
    """An error or warning line of one process is never cut by another's: logs.say writes it in one piece. The
    control, print, writes the text and its newline apart, and two processes' lines merge (as two ranks' refusals
    once read as one line)."""
    whole = [re.fullmatch(r"error: ([ab]) \d+ \1{100}", line) is not None for line in _lines_of_two_processes("say")]
    assert len(whole) == 10_000 and all(whole)
    control = _lines_of_two_processes("print")
    assert any(re.fullmatch(r"error: ([ab]) \d+ \1{100}", line) is None for line in control)


def test_processes_that_never_meet_are_named_with_the_address_to_check(tiny_shards: Path, tmp_path: Path) -> None:
    """Processes of a two-process job started alone, as when a node never starts or cannot reach the first node's
    address (the other rank never comes), one whose port another program holds, and one given a port past 65535:
    each ends within the collective timeout with the address, the setting and what to check (exit 69), or the
    taken or impossible port (exit 2), instead of a TCPStore traceback (exit 1)."""
    timeout = ("train.collective_timeout_s=3",)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [(0, free_port()), (1, free_port()), (0, taken.getsockname()[1]), (1, 70000)]
        procs = [
            rank_process(train_args(tiny_shards, tmp_path, f"alone{i}", "wae_mmd", *timeout), rank, 2, port)
            for i, (rank, port) in enumerate(cases)
        ]
        ended = outputs(procs)
    for rank, (proc, output, (_, port)) in enumerate(zip(procs[:2], ended, cases, strict=False)):
        assert proc.returncode == 69, output[-3000:]
        met = f"error: process {rank} of 2: the job's processes did not all meet at 127.0.0.1:{port} within 3 s"
        assert met in output and "MASTER_ADDR and MASTER_PORT" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    assert "1/2 clients joined" in ended[0], ended[0][-3000:]
    assert procs[2].returncode == 2, ended[2][-3000:]
    held = f"cannot host the job's rendezvous at 127.0.0.1:{cases[2][1]}: the port is in use by another program"
    assert held in ended[2], ended[2][-3000:]
    assert procs[3].returncode == 2, ended[3][-3000:]
    assert "MASTER_PORT='70000' is not a port number (1 to 65535)" in ended[3], ended[3][-3000:]
    assert "Traceback" not in ended[3], ended[3][-3000:]


def test_processes_that_do_not_run_the_same_experiment_are_refused(tiny_shards: Path, tmp_path: Path) -> None:
    """Two two-process jobs whose processes differ as nodes of a cluster can: one given another learning rate on its
    command line, one whose second node holds a stale copy of the shards (one shard fewer, under the same relative
    path). Each would train without a word (DDP averages gradients, not learning rates; the order would cut
    different shard lists); every process is refused instead, naming what differs and who holds what (exit 2)."""
    for node, shards in (("node0", 5), ("node1", 4)):
        copy = shutil.copytree(tiny_shards, tmp_path / node / "shards")
        sizes = json.loads((copy / "train" / "sizes.json").read_text())
        for name in sorted(sizes)[shards:]:
            (copy / "train" / name).unlink()
            del sizes[name]
        (copy / "train" / "sizes.json").write_text(json.dumps(sizes))
    relative = ("data.train=shards/train", "data.test=shards/test")
    lr, data = free_port(), free_port()
    procs = [
        rank_process(
            train_args(tiny_shards, tmp_path, "lr", "wae_mmd", *([] if rank == 0 else ["optim.lr=0.01"])), rank, 2, lr
        )
        for rank in (0, 1)
    ] + [
        rank_process(
            train_args(tiny_shards, tmp_path, "data", "wae_mmd", *relative), rank, 2, data, tmp_path / f"node{rank}"
        )
        for rank in (0, 1)
    ]
    ended = outputs(procs)
    for proc, output in zip(procs, ended, strict=True):
        assert proc.returncode == 2, output[-3000:]
        assert "error: the processes of the job do not run the same experiment: " in output, output[-3000:]
    assert re.search(r"optim\.lr is 0\.001 on process 0 \(.+\) but 0\.01 on process 1 \(", ended[0]), ended[0]
    assert re.search(
        r"training data is 5 shard\(s\), 500 samples, .* on process 0 .* but 4 shard\(s\), 400 samples", ended[2]
    ), ended[2]
    assert not (tmp_path / "mnist").exists()  # refused before the run directory is written


def test_a_process_that_fails_at_start_up_is_named_by_the_others_as_lost(tiny_shards: Path, tmp_path: Path) -> None:
    """A two-process job whose test data is missing on one node (simulated: a relative data.test and each process
    in a directory of its own): that process ends with its data error (exit 2), and the other, waiting for it in a
    start-up collective, printed gloo's traceback and exited 1, its exit status "crashed: RuntimeError: Connection
    reset by peer". It now says that another process stopped answering during the set-up, and where to look (exit
    69, the same in its exit status)."""
    port, procs = free_port(), []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        args = train_args(
            tiny_shards, tmp_path, "lost", "wae_mmd", "data.test=shards/test", "train.collective_timeout_s=20"
        )
        procs.append(rank_process(args, rank, 2, port, tmp_path / f"node{rank}"))
    (tmp_path / "node0" / "shards").mkdir()
    (tmp_path / "node0" / "shards" / "test").symlink_to(tiny_shards / "test")
    ended = outputs(procs)
    assert procs[1].returncode == 2 and "shards/test" in ended[1], ended[1][-3000:]
    assert procs[0].returncode == 69, ended[0][-3000:]
    assert "another process stopped answering while the run was being set up" in ended[0], ended[0][-3000:]
    assert "Traceback" not in ended[0], ended[0][-3000:]
    status = tmp_path / "mnist" / "lost" / "exit_status.json"
    assert not status.exists() or json.loads(status.read_text())["code"] == 69


def test_a_run_directory_the_processes_do_not_share_is_refused(tiny_shards: Path, tmp_path: Path) -> None:
    """A two-process job whose run.root is on each node's own disk (simulated: a relative run.root and each process
    in a directory of its own): each process would write a run directory of its own, and every checkpoint would miss
    the other's part. The process that cannot see the main process's run directory is named, every process stops
    (exit 2) before the first step, and the main process's exit status says why."""
    port, procs = free_port(), []
    for rank in (0, 1):
        (tmp_path / f"node{rank}").mkdir()
        args = train_args(tiny_shards, tmp_path, "local", "wae_mmd", "run.root=runs", "train.collective_timeout_s=20")
        procs.append(rank_process(args, rank, 2, port, tmp_path / f"node{rank}"))
    ended = outputs(procs)
    for proc, output in zip(procs, ended, strict=True):
        assert proc.returncode == 2, output[-3000:]
        assert "error: run.root: process 1 (" in output and "cannot see the run directory" in output, output[-3000:]
    status = json.loads((tmp_path / "node0/runs/mnist/local/exit_status.json").read_text())
    assert status["code"] == 2 and "cannot see the run directory" in status["reason"], status
    assert not (tmp_path / "node0/runs/mnist/local/metrics.jsonl").read_text()  # no step was trained
