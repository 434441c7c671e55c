"""Damaged checkpoints on shared storage, with real processes: a checkpoint loads whole or not at all; with
train.resume=auto each damaged newest one is named and passed over for the one before (and the run continues
exactly from the newest intact one), a damaged one named by train.resume=PATH is refused (exit 2), and every
start-up failure is recorded in exit_status.json."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.runkit import ddp, exit_status, run, same_weights, single, train_args
from tests.shardkit import RunsShell, truncate
from tests.test_config import alias_bomb

pytestmark = pytest.mark.distributed


def _plant_pickle(step: Path) -> None:
    """The random-generator file (the one pickle a checkpoint holds; tensors are safetensors) replaced by a pickle
    that touches ``pwned`` in the run directory, padded to the size state.json lists, its digest there replaced
    (as an attacker who can write the checkpoint would)."""
    target = step / "rng_rank0.pt"
    evil = pickle.dumps({"torch": RunsShell(step.parents[1] / "pwned")}, protocol=2)
    target.write_bytes(evil + b"\0" * (target.stat().st_size - len(evil)))
    state = json.loads((step / "state.json").read_text())  # and its digest, so that the unpickler is what refuses
    state["sha256"]["rng_rank0.pt"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (step / "state.json").write_text(json.dumps(state))


# what is damaged: the file the refusal must name, and the damage
DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "optimizer truncated": (
        "autoencoder.optim.safetensors",
        lambda step: truncate(step / "autoencoder.optim.safetensors", 100),
    ),
    "weights truncated": ("critic.safetensors", lambda step: truncate(step / "critic.safetensors", 40)),
    "rng file missing": ("rng_rank0.pt", lambda step: (step / "rng_rank0.pt").unlink()),
    "rng file a planted pickle of the listed size": ("rng_rank0.pt", _plant_pickle),
    "state.json missing": ("state.json", lambda step: (step / "state.json").unlink()),
    "state.json garbage": ("state.json", lambda step: (step / "state.json").write_text("{not json")),
    "state.json a pipe": ("state.json", lambda step: _replace(step / "state.json", os.mkfifo)),  # held open() for ever
    "state.json a link to /dev/zero": (  # read until memory ran out
        "state.json",
        lambda step: _replace(step / "state.json", lambda path: path.symlink_to("/dev/zero")),
    ),
    "config.yaml an alias bomb": ("config.yaml", lambda step: (step / "config.yaml").write_text(alias_bomb("model"))),
    "optimizer overwritten": (
        "autoencoder.optim.safetensors",
        lambda step: (step / "autoencoder.optim.safetensors").write_bytes(b"x"),
    ),
    "state.json of another step": ("state.json", lambda step: _restep(step / "state.json", -1)),
    "a weight turned NaN, the size kept": (
        "autoencoder.safetensors",
        lambda step: _change(step / "autoencoder.safetensors", float("nan")),
    ),
    "a weight changed in place, finite, the size kept": (
        "critic.safetensors",
        lambda step: _change(step / "critic.safetensors", 0.5),
    ),
}


def _replace(file: Path, make: Callable[[Path], None]) -> None:
    """``file`` removed and something else made in its place."""
    file.unlink()
    make(file)


def _change(file: Path, value: float) -> None:
    """One weight of a file set to ``value``: the file keeps its size, and state.json's sizes still match."""
    weights = load_file(file)
    next(iter(weights.values())).view(-1)[0] = value
    save_file(weights, file)


def _restep(state: Path, by: int) -> None:
    """state.json naming another step than its checkpoint's name (``step`` moved by ``by``)."""
    data = json.loads(state.read_text())
    state.write_text(json.dumps(data | {"step": data["step"] + by}))


EVERY = 4  # steps between the checkpoints of the run the tests damage


@pytest.fixture(scope="module")
def checkpointed(tiny_shards_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference configuration stopped with one checkpoint for each kind of damage and an older one: at steps
    4, 8, ..., 36."""
    root = tmp_path_factory.mktemp("checkpointed")
    args = [f"train.max_steps={EVERY * (len(DAMAGE) + 1)}", f"checkpoint.every_steps={EVERY}"]
    proc = run(single(train_args(tiny_shards_module, root, "run", "wae_gan", *args)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy(checkpointed: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the checkpointed run directory (its run.root), so that each test damages its own; the run
    directory and its checkpoints, newest first."""
    shutil.copytree(checkpointed, tmp_path / "root")
    run_dir = tmp_path / "root" / "mnist" / "run"
    return run_dir, sorted((run_dir / "checkpoints").glob("step_*"), reverse=True)


def test_auto_passes_over_damaged_newest_checkpoints(
    checkpointed: Path, reference: Path, tiny_shards_module: Path, tmp_path: Path
) -> None:
    """The newest checkpoints each damaged in another way (DAMAGE, one per checkpoint): the run names each one with
    its damaged file, passes over it for the one before, continues from the oldest, intact one and ends with the
    weights of an uninterrupted run, so nothing of a damaged checkpoint was applied. The planted pickle is refused
    unread: its command never runs. Partial checkpoints an attempt left (``step_N.tmp``, one holding a rank file
    of a larger world) are removed at start, so none of their files is published."""
    run_dir, steps = _copy(checkpointed, tmp_path)
    for (_, damage), step in zip(DAMAGE.values(), steps, strict=False):
        damage(step)
    # an operator's copy of the oldest checkpoint under a name of their own: not a checkpoint of the run (it
    # listed after every step_N and was continued from, again at every start, while pruning removed the newest)
    shutil.copytree(steps[-1], run_dir / "checkpoints" / "step_backup")
    for partial in ("step_00000040.tmp", "step_00000041.tmp"):  # 40: a step the continuation checkpoints
        (run_dir / "checkpoints" / partial).mkdir()
        (run_dir / "checkpoints" / partial / "rng_rank3.pt").write_bytes(b"stale")
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run")))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    passed_over = [line for line in output.splitlines() if "cannot be loaded" in line]
    log = (run_dir / "train.log").read_text()  # the operator reading the run's own log sees it too
    for (kind, (file, _)), step, line in zip(DAMAGE.items(), steps, passed_over, strict=False):
        assert f"{step.name} cannot be loaded" in line and file in line, (kind, line)
        assert f"{step.name} cannot be loaded" in log
    assert len(passed_over) == len(DAMAGE), output[-3000:]
    assert "posix.system" in output and "weights_only" not in output and not (run_dir / "pwned").exists()
    oldest = f"{steps[-1].name} (step {EVERY})"
    assert f"continuing from {steps[-1]}" in output and oldest in output and oldest in log
    assert same_weights(run_dir / "export" / "model.safetensors", reference / "export" / "model.safetensors")
    assert exit_status(run_dir)["code"] == 0
    assert "step_00000041.tmp" in log and not list((run_dir / "checkpoints").glob("*.tmp"))
    assert not (run_dir / "checkpoints" / "step_00000040" / "rng_rank3.pt").exists()
    assert (run_dir / "checkpoints" / "step_backup" / "COMPLETE").exists()  # theirs, kept


def test_a_damaged_checkpoint_named_by_path_is_refused(checkpointed: Path, tiny_shards_module: Path, tmp_path: Path):
    """train.resume=PATH names one checkpoint: damaged, it is refused with the file named (exit 2), and the exit
    status says so (not the previous attempt's 0)."""
    run_dir, (newest, *_) = _copy(checkpointed, tmp_path)
    truncate(newest / "autoencoder.optim.safetensors", 100)
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run", "wae_gan", f"train.resume={newest}")))
    assert again.returncode == 2, again.stderr[-3000:]
    assert "autoencoder.optim.safetensors" in again.stderr and "Traceback" not in again.stderr
    status = exit_status(run_dir)
    assert status["code"] == 2 and "autoencoder.optim.safetensors" in status["reason"]


def test_a_file_in_a_checkpoint_s_place_is_named_not_taken_for_a_full_disk(
    checkpointed: Path, tiny_shards_module: Path, tmp_path: Path
):
    """The newest checkpoint's directory replaced by a file: the run continues from the one before, and writing that
    step again fails on the file. It said to free space (exit 74) at every attempt; it now says to move the file."""
    _, (newest, *_) = _copy(checkpointed, tmp_path)
    shutil.rmtree(newest)
    newest.write_text("not a checkpoint")
    last = f"train.max_steps={EVERY * (len(DAMAGE) + 1)}"  # the fixture's last step: that checkpoint is written again
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run", "wae_gan", last)))
    assert again.returncode == 74, again.stderr[-3000:]
    assert str(newest) in again.stderr and "Move away what the error names" in again.stderr, again.stderr[-3000:]
    assert "Free space" not in again.stderr and newest.read_text() == "not a checkpoint"


def test_no_intact_checkpoint_refuses_to_start_over(checkpointed: Path, tiny_shards_module: Path, tmp_path: Path):
    """Every checkpoint damaged: the run refuses (exit 2) rather than start again from step 0 over its results."""
    run_dir, steps = _copy(checkpointed, tmp_path)
    for step in steps:
        (step / "rng_rank0.pt").unlink()
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run")))
    assert again.returncode == 2, again.stderr[-3000:]
    assert "no checkpoint" in again.stderr and "rng_rank0.pt" in again.stderr
    assert exit_status(run_dir)["code"] == 2
    assert sorted((run_dir / "checkpoints").glob("step_*"), reverse=True) == steps


def test_missing_rank_file_under_ddp_falls_back_on_every_rank(tiny_shards_module: Path, tmp_path: Path) -> None:
    """Two processes: rank 1's RNG file of the newest checkpoint is gone. Both ranks pass over it together (a resume
    is exact or refused, never silently approximate) and continue from the previous checkpoint."""
    args = train_args(tiny_shards_module, tmp_path, "ddp", "wae_mmd", "train.max_steps=10")
    assert run(ddp(args)).returncode == 0
    run_dir = tmp_path / "mnist" / "ddp"
    (run_dir / "checkpoints" / "step_00000010" / "rng_rank1.pt").unlink()
    again = run(ddp([*args, "train.max_steps=12"]))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "rng_rank1.pt" in output and "step_00000005 (step 5)" in output
    assert exit_status(run_dir) == {"code": 0, "reason": "finished", "step": 12}
