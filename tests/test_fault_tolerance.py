"""Fault tolerance with real processes: exact resume after SIGKILL, stop requests, refused checkpoints, a dead
rank, non-finite losses, and what MLflow sees across all of it."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.runkit import (
    ddp,
    exit_status,
    finish,
    kill_group,
    local_mlflow,
    losses,
    metric_rows,
    run,
    same_weights,
    single,
    start,
    train_args,
    two_ranks,
    wait_for_step,
)
from vegan_scale.distributed.whereabouts import lost_peer

pytestmark = pytest.mark.distributed


def _mlflow_losses(run_dir: Path) -> dict[int, float]:
    """The training loss of each step in the run's MLflow store (a step held twice fails)."""
    client, run_id = local_mlflow(run_dir)
    history = client.get_metric_history(run_id, "train/loss")
    values = {m.step: m.value for m in history}
    assert len(values) == len(history), sorted(m.step for m in history)
    return values


def test_sigkill_then_resume_is_bitwise_exact_one_process(
    tiny_shards_module: Path, reference: Path, tmp_path: Path
) -> None:
    """A run killed with SIGKILL mid-way and started again ends with the uninterrupted run's weights, bit for bit,
    and its MLflow run holds every step exactly once, with the uninterrupted run's values."""
    run_dir = tmp_path / "mnist" / "killed"
    args = train_args(tiny_shards_module, tmp_path, "killed", "wae_gan", "tracking.backend=mlflow")
    proc = start(single(args))
    wait_for_step(proc, run_dir, 17)
    kill_group(proc)
    finish(proc)
    assert not (run_dir / "exit_status.json").exists()  # killed: nothing could be written
    again = run(single(args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing from" in again.stdout + again.stderr
    log = (run_dir / "train.log").read_text()  # said while the run was built, before its log file existed
    assert re.search(r"\| continuing from \S+step_\d+ \(step \d+\)\n", log)
    assert same_weights(run_dir / "export" / "model.safetensors", reference / "export" / "model.safetensors")
    # none missing, none twice, and the values the uninterrupted run wrote down
    assert _mlflow_losses(run_dir) == losses(reference) and len(losses(reference)) == 40


def test_sigkill_then_resume_is_bitwise_exact_ddp(tiny_shards_module: Path, tmp_path: Path) -> None:
    """The same with 2 DDP processes: launcher and workers killed together, then launched again."""
    run_dir = tmp_path / "mnist" / "ddp"
    full = run(ddp(train_args(tiny_shards_module, tmp_path, "ddp_full")))
    assert full.returncode == 0, full.stderr[-3000:]
    proc = start(ddp(train_args(tiny_shards_module, tmp_path, "ddp")))
    wait_for_step(proc, run_dir, 13)
    kill_group(proc)
    finish(proc)
    again = run(ddp(train_args(tiny_shards_module, tmp_path, "ddp")))
    assert again.returncode == 0, again.stderr[-3000:]
    assert same_weights(
        run_dir / "export" / "model.safetensors", tmp_path / "mnist" / "ddp_full" / "export" / "model.safetensors"
    )


@pytest.mark.parametrize("how", ["flag file", "SIGTERM"])
def test_stop_request_checkpoints_and_exits(
    tiny_shards_module: Path, reference: Path, tmp_path: Path, how: str
) -> None:
    """A stop request (the flag file, or SIGTERM to the process alone) ends a single process after a checkpoint:
    exit 75, the code in exit_status.json too; the continuation ends where the uninterrupted run did. The stop is
    seen at step 20 (the first check after step 7), which is due an evaluation: it is made before the stop, and
    the continued run's records hold every step's loss and both evaluations, as the uninterrupted run's. SIGUSR1
    and SIGINT (130) are tested sent to every process of the run, workers included (tests/test_signals.py)."""
    run_dir = tmp_path / "mnist" / "stopped"
    args = train_args(tiny_shards_module, tmp_path, "stopped", "wae_gan", "train.check_every=20")
    args += ["checkpoint.every_steps=20"]
    proc = start(single(args))
    wait_for_step(proc, run_dir, 7)
    if how == "flag file":
        (run_dir / "PREEMPT").touch()
    else:
        os.kill(proc.pid, getattr(signal, how))
    code, out = finish(proc)
    expected = 75
    assert code == expected, out[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == expected and status["step"] == 20
    assert (run_dir / "checkpoints" / "step_00000020" / "COMPLETE").exists()
    assert list(losses(run_dir, "eval/recon")) == [20]
    again = run(single(args))
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (run_dir / "PREEMPT").exists()
    assert same_weights(run_dir / "export" / "model.safetensors", reference / "export" / "model.safetensors")
    for key in ("train/loss", "eval/recon", "eval/latent_mmd"):
        assert losses(run_dir, key) == losses(reference, key), key


def test_a_stop_at_the_last_step_finishes_the_run(tiny_shards_module: Path, tmp_path: Path) -> None:
    """A stop request seen at the run's last step (its only check after the start) ended it with exit 75 and no
    export: a requeued attempt started only to export. The run has ended: it finishes, exports, and exits 0."""
    run_dir = tmp_path / "mnist" / "last"
    proc = start(
        single(
            train_args(
                tiny_shards_module, tmp_path, "last", "wae_mmd", "train.check_every=1000", "checkpoint.every_steps=40"
            )
        )
    )
    wait_for_step(proc, run_dir, 7)
    (run_dir / "PREEMPT").touch()
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert exit_status(run_dir)["code"] == 0 and (run_dir / "export" / "model.yaml").exists()


def test_stop_request_under_a_launcher(tiny_shards_module: Path, tmp_path: Path) -> None:
    """Under accelerate launch the flag file stops both ranks after a checkpoint; the launcher reports 1, the
    marker written after the checkpoint says 75."""
    run_dir = tmp_path / "mnist" / "launched"
    proc = start(ddp(train_args(tiny_shards_module, tmp_path, "launched")))
    wait_for_step(proc, run_dir, 7)
    (run_dir / "PREEMPT").touch()
    code, out = finish(proc)
    assert code != 0, out[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == 75 and (run_dir / "checkpoints" / f"step_{status['step']:08d}" / "COMPLETE").exists()


def test_a_run_moved_renamed_and_continued_with_other_workers_ends_as_the_uninterrupted_one(
    tiny_shards_module: Path, reference: Path, tmp_path: Path
) -> None:
    """A run killed mid-way, its directory moved under another experiment and name, and continued with two loader
    workers where it had none, its shards read from a copy elsewhere (another cluster's storage, a laptop): where
    the run and its data lie and the worker count shape nothing (the batches are the same at any worker count), so
    it ends with the uninterrupted run's weights, bit for bit. All were refused as settings that "shape the model,
    the optimisation or the data order"."""
    args = train_args(tiny_shards_module, tmp_path, "before", "wae_gan")
    proc = start(single(args))
    wait_for_step(proc, tmp_path / "mnist" / "before", 17)
    kill_group(proc)
    finish(proc)
    (tmp_path / "moved").mkdir()
    (tmp_path / "mnist" / "before").rename(tmp_path / "moved" / "after")
    copy = shutil.copytree(tiny_shards_module, tmp_path / "elsewhere" / "shards")
    elsewhere = [f"data.train={copy / 'train'}", f"data.test={copy / 'test'}"]
    moved = [*args, "run.name=after", "run.experiment=moved", "data.num_workers=2", *elsewhere]
    again = run(single(moved))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing from" in again.stdout + again.stderr
    assert same_weights(
        tmp_path / "moved" / "after" / "export" / "model.safetensors", reference / "export" / "model.safetensors"
    )


def test_a_continuation_does_not_show_the_previous_attempts_outcome(tiny_shards_module: Path, tmp_path: Path) -> None:
    """A finished run continued for more steps, killed past its next checkpoint: its exit_status.json said
    "finished" at the old step (`sync` set the MLflow run FINISHED, a sweep skipped it), and `vegan-scale eval` of
    the run evaluated the old export labelled with the newest checkpoint's step. The continuation removes the old
    status when it starts; the export keeps its step, and the run's newest checkpoint is what a reader of the run
    gets."""
    from vegan_scale import export
    from vegan_scale.evaluation.model_source import open_model

    run_dir = tmp_path / "mnist" / "cont"
    args = train_args(tiny_shards_module, tmp_path, "cont", "wae_mmd")
    assert run(single([*args, "train.max_steps=10"])).returncode == 0
    assert exit_status(run_dir)["step"] == 10 and export.step_of(run_dir / "export") == 10
    proc = start(single([*args, "train.max_steps=400"]))
    wait_for_step(proc, run_dir, 17)  # past the checkpoint of step 15
    kill_group(proc)
    finish(proc)
    assert not (run_dir / "exit_status.json").exists()
    source = open_model(run_dir)
    assert source.step >= 15 and source.weights.parent.name == f"step_{source.step:08d}"
    assert open_model(run_dir / "export").step == 10


def test_a_continuation_over_other_shards_in_the_same_place_is_refused(tmp_path: Path) -> None:
    """The training shards written again in the same directory (other images, other counts) between two attempts:
    the continuation went on in another data order, its epochs of another length, without a word. The checkpoint
    records the shards it was written over (their list and counts), and a continuation over others is refused,
    naming both."""
    from tests.conftest import synthetic_images, write_tiny_shards
    from vegan_scale.data.sources import ArraySource
    from vegan_scale.data.write import write_shards

    shards = write_tiny_shards(tmp_path / "data")
    args = train_args(shards, tmp_path, "moved_data", "wae_mmd")
    assert run(single([*args, "train.max_steps=5"])).returncode == 0
    shutil.rmtree(shards / "train")
    write_shards(ArraySource(synthetic_images(300, seed=9), np.arange(300) % 10), shards / "train", prefix="other")
    again = run(single([*args, "train.max_steps=8"]))
    assert again.returncode == 2, again.stderr[-3000:]
    assert "the training shards are not those step_00000005 was written over (then 5 shard(s), 500 samples" in (
        again.stderr
    ), again.stderr[-3000:]


def test_resume_policy(tiny_shards_module: Path, tmp_path: Path) -> None:
    """Continuing with another network is refused with the key named (exit 2), and so is train.resume=never; neither
    refusal touches the finished run's exit status. A longer run may continue, also from a checkpoint written before
    a key existed (the key's default is what that run did)."""
    args = train_args(tiny_shards_module, tmp_path, "policy", "wae_mmd", "train.max_steps=5")
    assert run(single(args)).returncode == 0
    status = tmp_path / "mnist" / "policy" / "exit_status.json"
    finished = status.read_text()
    changed = run(single([*args, "model.mlp.hidden=[16]"]))
    assert changed.returncode == 2 and "model.mlp.hidden" in changed.stderr
    never = run(single([*args, "train.resume=never"]))
    assert never.returncode == 2 and "already holds a run" in never.stderr
    assert status.read_text() == finished and json.loads(finished)["code"] == 0
    saved = tmp_path / "mnist" / "policy" / "checkpoints" / "step_00000005" / "config.yaml"
    older = yaml.safe_load(saved.read_text())
    del older["train"]["grad_compression"]  # as an older version wrote it
    saved.write_text(yaml.safe_dump(older))
    state = json.loads((saved.parent / "state.json").read_text())
    state["files"]["config.yaml"] = saved.stat().st_size
    del state["sha256"]  # older versions kept no digests
    (saved.parent / "state.json").write_text(json.dumps(state))
    longer = run(single([*args, "train.max_steps=8"]))
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "continuing from" in longer.stdout + longer.stderr


def test_a_directory_holding_no_run_but_other_files_is_refused_and_kept(tiny_shards_module: Path, tmp_path: Path):
    """run.root or run.name naming someone's directory: training wrote its config.yaml over theirs and its
    train.log among their files. It is refused (exit 2) naming what it holds, and nothing in it changes."""
    theirs = tmp_path / "mnist" / "theirs"
    theirs.mkdir(parents=True)
    for name in ("config.yaml", "notes.txt"):
        (theirs / name).write_text("theirs\n")
    refused = run(single(train_args(tiny_shards_module, tmp_path, "theirs", "wae_mmd", "train.max_steps=2")))
    assert refused.returncode == 2 and "holds no run but other files (notes.txt)" in refused.stderr, refused.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["config.yaml", "notes.txt"]
    assert (theirs / "config.yaml").read_text() == "theirs\n"


def test_nonfinite_loss_stops_all_ranks_and_keeps_the_checkpoint(tiny_shards_module: Path, tmp_path: Path) -> None:
    """An exploding learning rate: both DDP ranks stop with the step and the loss term named, exit code 65 in the
    marker, and the checkpoint written before it is untouched."""
    args = train_args(
        tiny_shards_module,
        tmp_path,
        "nan",
        "wae_mmd",
        "train.max_steps=40",
        "optim.lr=1e12",
        "train.encoder_pretrain_steps=0",  # which would meet the exploding rate first
        "checkpoint.every_steps=1",
        "train.check_every=1",
    )
    proc = run(ddp(args))
    run_dir = tmp_path / "mnist" / "nan"
    status = exit_status(run_dir)
    assert proc.returncode != 0 and status["code"] == 65
    assert "became NaN or infinite at step" in status["reason"] and "train/" in status["reason"]
    bad_step = int(status["reason"].split("at step ")[1].split(";")[0])
    saved = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "COMPLETE").exists())
    assert saved and int(saved[-1].name.removeprefix("step_")) < bad_step
    from safetensors.torch import load_file

    assert all(t.isfinite().all() for t in load_file(saved[-1] / "autoencoder.safetensors").values())


def test_a_dead_rank_ends_the_others_within_the_timeout(tiny_shards_module: Path, tmp_path: Path) -> None:
    """Two processes started without a launcher: rank 1 is killed; rank 0 stops with exit code 69 well within
    train.collective_timeout_s instead of hanging."""
    args = train_args(
        tiny_shards_module, tmp_path, "dead", "wae_mmd", "train.max_steps=100000", "train.collective_timeout_s=60"
    )
    procs = two_ranks(args)
    run_dir = tmp_path / "mnist" / "dead"
    wait_for_step(procs[0], run_dir, 5, timeout=120)
    procs[1].kill()
    start_wait = time.monotonic()
    out, _ = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 69, out[-3000:]
    assert time.monotonic() - start_wait < 90
    assert exit_status(run_dir)["code"] == 69


def test_a_stopped_rank_is_named_by_the_others(tiny_shards_module: Path, tmp_path: Path) -> None:
    """Rank 1 of two frozen mid-run (SIGSTOP: alive, silent, as a stuck node is): rank 0's collective times out
    after train.collective_timeout_s, it writes where it was with its stack, and its exit status (69) names rank 1
    as the rank that never arrived, with the step of its last heartbeat."""
    args = train_args(
        tiny_shards_module, tmp_path, "frozen", "wae_mmd", "train.max_steps=100000", "train.collective_timeout_s=8"
    )
    procs = two_ranks(args)
    run_dir = tmp_path / "mnist" / "frozen"
    try:
        wait_for_step(procs[0], run_dir, 6, timeout=120)
        os.kill(procs[1].pid, signal.SIGSTOP)
        out, _ = procs[0].communicate(timeout=120)
    finally:
        os.killpg(procs[1].pid, signal.SIGKILL)
        procs[1].communicate()
    assert procs[0].returncode == 69, out[-3000:]
    status = exit_status(run_dir)
    assert status["code"] == 69 and "rank(s) 1 never arrived" in status["reason"], status
    assert "rank 1 last reported step" in status["reason"] and str(run_dir / "ranks") in status["reason"]
    report = json.loads((run_dir / "ranks" / "rank0.json").read_text())
    assert report["timed_out"] and report["step"] >= 6
    stack = (run_dir / "ranks" / "rank0.stack.txt").read_text()
    assert "Every thread" in stack and "vegan_scale" in stack and 'File "' in stack
    assert not json.loads((run_dir / "ranks" / "rank1.json").read_text())["timed_out"]  # its last heartbeat


def test_only_a_transport_s_failure_counts_as_a_lost_process() -> None:
    """gloo's own words when its peer exits or stops answering (captured from two gloo processes of torch 2.13,
    one of them ended or asleep mid all-reduce) and torch's DistError are a lost process (exit 69 and the ranks'
    whereabouts); a RuntimeError of the run's own that says "timeout" or "peer" is itself, and keeps its exit code."""
    gloo = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/"
    lost = [
        RuntimeError(f"{gloo}pair.cc:553] Connection closed by peer [127.0.0.1]:45721. This is typically caused"),
        RuntimeError(f"{gloo}unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete"),
        torch.distributed.DistNetworkError("failed to recv, got 0 bytes"),
    ]
    own = [
        RuntimeError("timeout reading s3://bucket/shard-000001.tar after 3 tries"),
        RuntimeError("the peer's checkpoint has another shape"),
        ValueError(f"{gloo}pair.cc:553] Connection closed by peer"),
    ]
    assert [lost_peer(e) for e in lost] == [True] * 3
    assert [lost_peer(e) for e in own] == [False] * 3


def test_init_from_export(tiny_shards_module: Path, tmp_path: Path) -> None:
    """A new run with train.init_from starts from the exported weights (one step at learning rate 0 keeps them);
    an export of another network is refused naming the difference."""
    first = run(single(train_args(tiny_shards_module, tmp_path, "source", "wae_mmd", "train.max_steps=5")))
    assert first.returncode == 0, first.stderr[-3000:]
    exported = tmp_path / "mnist" / "source" / "export"
    args = train_args(
        tiny_shards_module,
        tmp_path,
        "warm",
        "wae_mmd",
        "train.max_steps=1",
        "optim.lr=0",
        f"train.init_from={exported}",
    )
    warm = run(single(args))
    assert warm.returncode == 0, warm.stderr[-3000:]
    assert same_weights(tmp_path / "mnist" / "warm" / "export" / "model.safetensors", exported / "model.safetensors")
    other = run(single([*args, "run.name=other", "model.mlp.hidden=[16]"]))
    assert other.returncode == 2 and "model.mlp.hidden" in other.stderr


def test_a_run_started_again_while_it_trains_is_refused_and_touches_nothing(
    tiny_shards_module: Path, tmp_path: Path
) -> None:
    """The same run started a second time while it trains (a job submitted again with the same run name), under
    accelerate launch with 2 processes: every process of the second stops with exit 2, naming the process that
    holds the run, before it reads the first's checkpoints, and writes nothing there (before, it continued from
    the first's checkpoints and wrote into the same files). The first trains on as if alone: stopped later, every
    step's loss is written down once."""
    run_dir = tmp_path / "mnist" / "twice"
    args = train_args(
        tiny_shards_module, tmp_path, "twice", "wae_mmd", "train.max_steps=100000", "tracking.log_every=5"
    )
    first = start(single(args))
    try:
        wait_for_step(first, run_dir, 10)
        config = (run_dir / "config.yaml").stat().st_mtime_ns
        second = run(ddp(args))
        assert first.poll() is None and not (run_dir / "exit_status.json").exists()
        assert (run_dir / "config.yaml").stat().st_mtime_ns == config
        os.killpg(first.pid, signal.SIGTERM)
        code, out = finish(first)
    finally:
        if first.poll() is None:
            kill_group(first)
    # the launcher reports its workers' exit in a traceback of its own
    assert second.returncode != 0 and not re.search(r'File ".*/vegan_scale/', second.stderr), second.stderr[-3000:]
    refusals = [line for line in second.stderr.splitlines() if line.startswith("error: run directory")]
    assert len(refusals) == 2 and f"process {first.pid} on" in refusals[0], second.stderr[-3000:]
    assert "in use by another process of this run (a training, process" in refusals[0] and refusals[0] == refusals[1]
    assert "continuing from" not in second.stdout + second.stderr  # refused before it read the first's checkpoints
    assert code == 75, out[-3000:]
    steps, stop = [step for step, _ in metric_rows(run_dir)], exit_status(run_dir)["step"]
    assert steps == [*range(5, stop + 1, 5), *([stop] if stop % 5 else [])], steps  # and the stop's step


def test_a_run_directory_another_training_made_while_this_one_started_is_refused(
    tiny_shards_module: Path, tmp_path: Path
) -> None:
    """Two trainings of one new run started together: the second looked for checkpoints before the first made the
    directory (nothing to lock yet), then took the directory over once the first had gone, trained from step 1
    over the first's run, and pruned its new checkpoints under the first's newer ones. The main process's second
    look (before the directory is first written) now finds the run the other made, and refuses, touching nothing."""
    from types import SimpleNamespace

    from vegan_scale.engine import job
    from vegan_scale.errors import RunDirInUseError
    from vegan_scale.rundir import RunDir

    run_dir, main = RunDir(tmp_path / "mnist" / "race"), SimpleNamespace(is_main_process=True, num_processes=1)
    assert job.own_run_dir(run_dir, main, held=None, create=False) is None  # new: nothing to lock yet
    other = run(single(train_args(tiny_shards_module, tmp_path, "race", "wae_mmd", "train.max_steps=5")))
    assert other.returncode == 0, other.stderr[-3000:]
    written = lambda: sorted((p.name, p.stat().st_mtime_ns) for p in run_dir.path.rglob("*") if p != run_dir.lock)  # noqa: E731
    before = written()
    with pytest.raises(RunDirInUseError, match="was new when this training started, and another training"):
        job.own_run_dir(run_dir, main, held=None, create=True)
    assert written() == before
