"""Damaged checkpoints on shared storage, with real processes: a checkpoint loads whole or not at all; with
train.resume=auto a damaged newest one is named and passed over for the previous one (and the run continues
exactly from there), a damaged one named by train.resume=PATH is refused (exit 2), and every start-up failure is
recorded in exit_status.json."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.runkit import ddp, exit_status, run, same_weights, single, train_args
from tests.shardkit import truncate
from tests.test_config import alias_bomb

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ten_steps(tiny_shards_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference configuration stopped after 10 steps: checkpoints at steps 5 and 10."""
    root = tmp_path_factory.mktemp("ten")
    proc = run(single(train_args(tiny_shards_module, root, "run", "wae_gan", "train.max_steps=10")))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _copy(ten_steps: Path, tmp_path: Path) -> Path:
    """A copy of the 10-step run directory (its run.root), so that each case damages its own."""
    shutil.copytree(ten_steps, tmp_path / "root")
    return tmp_path / "root" / "mnist" / "run"


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "optimizer truncated": (
        "autoencoder.optim.safetensors",
        lambda step: truncate(step / "autoencoder.optim.safetensors", 100),
    ),
    "weights truncated": ("critic.safetensors", lambda step: truncate(step / "critic.safetensors", 40)),
    "rng file missing": ("rng_rank0.pt", lambda step: (step / "rng_rank0.pt").unlink()),
    "state.json missing": ("state.json", lambda step: (step / "state.json").unlink()),
    "state.json garbage": ("state.json", lambda step: (step / "state.json").write_text("{not json")),
    "config.yaml an alias bomb": ("config.yaml", lambda step: (step / "config.yaml").write_text(alias_bomb("model"))),
    "optimizer overwritten": (
        "autoencoder.optim.safetensors",
        lambda step: (step / "autoencoder.optim.safetensors").write_bytes(b"x"),
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_auto_passes_over_a_damaged_newest_checkpoint(
    damage: str, ten_steps: Path, reference: Path, tiny_shards_module: Path, tmp_path: Path
) -> None:
    """The newest checkpoint damaged: the run names the file, continues from the one before, and ends with the
    weights of an uninterrupted run (so nothing of the damaged checkpoint was applied)."""
    run_dir = _copy(ten_steps, tmp_path)
    file, make_damage = DAMAGE[damage]
    make_damage(run_dir / "checkpoints" / "step_00000010")
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run")))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "step_00000010 cannot be loaded" in output and file in output, output[-3000:]
    assert "continuing from" in output and "step_00000005 (step 5)" in output
    log = (run_dir / "train.log").read_text()  # the operator reading the run's own log sees it too
    assert "step_00000010 cannot be loaded" in log and "step_00000005 (step 5)" in log
    assert same_weights(run_dir / "export" / "model.safetensors", reference / "export" / "model.safetensors")
    assert exit_status(run_dir)["code"] == 0


def test_a_damaged_checkpoint_named_by_path_is_refused(ten_steps: Path, tiny_shards_module: Path, tmp_path: Path):
    """train.resume=PATH names one checkpoint: damaged, it is refused with the file named (exit 2), and the exit
    status says so (not the previous attempt's 0)."""
    run_dir = _copy(ten_steps, tmp_path)
    newest = run_dir / "checkpoints" / "step_00000010"
    truncate(newest / "autoencoder.optim.safetensors", 100)
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run", "wae_gan", f"train.resume={newest}")))
    assert again.returncode == 2, again.stderr[-3000:]
    assert "autoencoder.optim.safetensors" in again.stderr and "Traceback" not in again.stderr
    status = exit_status(run_dir)
    assert status["code"] == 2 and "autoencoder.optim.safetensors" in status["reason"]


def test_no_intact_checkpoint_refuses_to_start_over(ten_steps: Path, tiny_shards_module: Path, tmp_path: Path):
    """Every checkpoint damaged: the run refuses (exit 2) rather than start again from step 0 over its results."""
    run_dir = _copy(ten_steps, tmp_path)
    for step in ("step_00000005", "step_00000010"):
        (run_dir / "checkpoints" / step / "rng_rank0.pt").unlink()
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run")))
    assert again.returncode == 2, again.stderr[-3000:]
    assert "no checkpoint" in again.stderr and "rng_rank0.pt" in again.stderr
    assert exit_status(run_dir)["code"] == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000010"]


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


class _Touch:
    """Unpickling this runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_of_the_listed_size_is_refused_unread(
    ten_steps: Path, reference: Path, tiny_shards_module: Path, tmp_path: Path
) -> None:
    """The random-generator file (the one pickle a checkpoint holds; tensors are safetensors) replaced by a pickle
    that runs a command, padded to the size state.json lists (as an attacker who read it would): the unpickler
    refuses it, the command never runs, and the run continues from the checkpoint before."""
    import pickle

    run_dir = _copy(ten_steps, tmp_path)
    target = run_dir / "checkpoints" / "step_00000010" / "rng_rank0.pt"
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"torch": _Touch(marker)}, protocol=2)
    target.write_bytes(evil + b"\0" * (target.stat().st_size - len(evil)))
    again = run(single(train_args(tiny_shards_module, tmp_path / "root", "run")))
    output = again.stdout + again.stderr
    assert again.returncode == 0, output[-3000:]
    assert "refusing to load" in output and "rng_rank0.pt" in output and "posix.system" in output
    assert "weights_only" not in output and not marker.exists()
    assert same_weights(run_dir / "export" / "model.safetensors", reference / "export" / "model.safetensors")
