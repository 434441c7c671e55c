"""Checkpoints: layout, exact round trips (against the tensors and optimizer that were saved) and refusal of code."""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from tests.shardkit import RunsShell
from vegan_scale import checkpoint
from vegan_scale.checkpoint import commit, read_module, read_optimizer
from vegan_scale.distributed.trainable import load_optimizer_by_name, optimizer_by_name
from vegan_scale.errors import CheckpointError
from vegan_scale.rundir import complete_checkpoints


def save(root: Path, step: int, keep_last_k: int = 2, modules: dict | None = None, state: dict | None = None) -> Path:
    """Write a checkpoint of ``modules`` ({name: (state_dict, optimizer_state)}) the way training does, and commit."""
    directory = checkpoint.tmp_dir(root, step)
    checkpoint.write_rank_state(directory, 0)
    for name, (weights, optim) in (modules or {"autoencoder": ({"w": torch.full((2,), float(step))}, {})}).items():
        checkpoint.save_module(directory, name, weights, optim)
    checkpoint.write_state(directory, state or {"step": step}, "schema_version: 1\n")
    return commit(root, step, keep_last_k)


def test_layout_after_commit(tmp_path):
    """Every process's part and the main state land in step_XXXXXXXX/ with COMPLETE, and `latest` names it."""
    root = tmp_path / "checkpoints"
    directory = checkpoint.tmp_dir(root, 1000)
    for rank in (0, 1):
        checkpoint.write_rank_state(directory, rank)
    checkpoint.save_module(directory, "autoencoder", {"w": torch.ones(3)}, {"w/step": torch.tensor(1.0)})
    checkpoint.save_module(directory, "critic", {"c": torch.zeros(1)}, {})
    checkpoint.write_state(directory, {"step": 1000, "epoch": 2}, "schema_version: 1\n")
    assert not complete_checkpoints(root)  # nothing counts before commit
    final = commit(root, 1000, keep_last_k=2)
    assert final == root / "step_00001000"
    parts = [
        "autoencoder.safetensors",
        "autoencoder.optim.safetensors",
        "critic.safetensors",
        "critic.optim.safetensors",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "state.json",
        "config.yaml",
    ]
    assert sorted(p.name for p in final.iterdir()) == sorted(["COMPLETE", *parts])
    assert (root / "latest").read_text().strip() == "step_00001000"
    listed = {name: (final / name).stat().st_size for name in parts if name != "state.json"}  # with sizes
    digests = {name: hashlib.sha256((final / name).read_bytes()).hexdigest() for name in listed}  # and digests
    assert json.loads((final / "state.json").read_text()) == {
        "step": 1000,
        "epoch": 2,
        "files": listed,
        "sha256": digests,
    }
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00001000"]  # no .tmp left
    assert complete_checkpoints(root) == [final]


def test_weights_round_trip_exactly(tmp_path):
    """read_module returns the saved tensors bit for bit: dtypes, non-contiguous views and tensors with grad."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=gen, requires_grad=True)
    model = {
        "enc.weight": weight,
        "enc.bias.T": torch.randn(3, 5, generator=gen).t(),  # non-contiguous
        "half": torch.randn(7, generator=gen).to(torch.bfloat16),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
    }
    critic = {"fc.weight": torch.randn(2, 2, generator=gen, dtype=torch.float64)}
    final = save(tmp_path, 5, modules={"autoencoder": (model, {}), "critic": (critic, {})})
    got_model, got_critic = read_module(final, "autoencoder"), read_module(final, "critic")
    assert set(got_model) == set(model) and set(got_critic) == set(critic)
    for saved, got in [*((model[k], got_model[k]) for k in model), (critic["fc.weight"], got_critic["fc.weight"])]:
        assert got.dtype == saved.dtype and torch.equal(got, saved.detach())


def test_rng_state_restores_the_draws(tmp_path):
    """The saved RNG state, loaded with weights_only=True, reproduces the random draws that followed the save."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        torch.rand(3)
        checkpoint.write_rank_state(tmp_path, rank=0)
        expected = torch.rand(5)
        state = torch.load(tmp_path / "rng_rank0.pt", weights_only=True)
        torch.set_rng_state(state["torch"])
        assert torch.equal(torch.rand(5), expected)


def test_optimizer_state_continues_identically(tmp_path):
    """An Adam saved by parameter name and restored (into a fresh Adam, from read_optimizer, with weights from
    read_module) takes the same next step as the original."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.5, 0.999))
    data = torch.randn(16, 4), torch.randn(16, 1)

    def step(m, o):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(data[0]), data[1]).backward()
        o.step()

    for _ in range(3):
        step(model, opt)
    final = save(tmp_path, 3, modules={"autoencoder": (model.state_dict(), optimizer_by_name(model, opt))})

    restored = copy.deepcopy(model)
    for p in restored.parameters():  # make sure the weights really come from the checkpoint
        p.data.zero_()
    restored.load_state_dict(read_module(final, "autoencoder"))
    restored_opt = torch.optim.Adam(restored.parameters(), lr=1e-2, betas=(0.5, 0.999))
    load_optimizer_by_name(restored, restored_opt, read_optimizer(final, "autoencoder"))
    assert set(read_optimizer(final, "autoencoder")) == {
        f"{n}/{k}" for n, _ in model.named_parameters() for k in ("exp_avg", "exp_avg_sq", "step")
    }

    step(model, opt)
    step(restored, restored_opt)
    for p, q in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("damage", [b"{not json", bytes(range(256)), b"[" * 100_000], ids=["garbage", "binary", "deep"])
def test_a_damaged_state_json_is_a_checkpoint_error(tmp_path, damage):
    """Whatever a damaged state.json holds (garbage, bytes that are not UTF-8, nesting deeper than Python follows),
    reading it is a CheckpointError naming it, which a resume passes over, never a crash."""
    final = save(tmp_path / "checkpoints", 5)
    (final / checkpoint.STATE).write_bytes(damage)
    with pytest.raises(CheckpointError, match=r"state\.json cannot be read"):
        checkpoint.read_state(final)


@pytest.mark.parametrize("weight", ["abc", None, float("inf"), float("nan"), -5, True])
def test_a_penalty_weight_that_is_no_weight_is_damage(tmp_path, weight):
    """The adaptive lambda a continuation takes up from state.json: text or null were a traceback inside the
    objective, infinity a "loss became NaN, lower optim.lr" (exit 65), a negative weight trained on without a word.
    Each is a CheckpointError naming the file (a resume passes over it); a weight >= 0 is read."""
    final = save(tmp_path / "checkpoints", 5)
    state = {**json.loads((final / checkpoint.STATE).read_text()), "world_size": 1, "deepspeed": False}
    (final / checkpoint.STATE).write_text(json.dumps({**state, "penalty_weight": weight}))
    with pytest.raises(CheckpointError, match=r"state\.json holds penalty_weight .*not a finite weight >= 0"):
        checkpoint.read_state(final)
    (final / checkpoint.STATE).write_text(json.dumps({**state, "penalty_weight": 2.5}))
    assert checkpoint.read_state(final)["penalty_weight"] == 2.5


def test_a_checkpoint_linked_from_other_storage_is_pruned_by_its_link(tmp_path):
    """An operator moved an old checkpoint to other storage and linked it back: pruning it failed (rmtree refuses
    a link) after the new checkpoint was published, stopping the run as "could not be written" and leaving a
    step_N.tmp link on which every later start failed. The link goes, what it points to stays; a link left as a
    partial checkpoint is removed at start the same way."""
    from vegan_scale.rundir import RunDir

    root = tmp_path / "run" / "checkpoints"
    save(root, 10)
    elsewhere = tmp_path / "elsewhere" / "step_00000010"
    elsewhere.parent.mkdir()
    (root / "step_00000010").rename(elsewhere)
    (root / "step_00000010").symlink_to(elsewhere)
    save(root, 20, keep_last_k=1)
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000020"] and elsewhere.is_dir()
    assert not [p for p in root.iterdir() if p.is_symlink()]
    (root / "step_00000030.tmp").symlink_to(elsewhere)
    RunDir(tmp_path / "run").prepare("{}\n", 0.0)
    assert not (root / "step_00000030.tmp").is_symlink() and elsewhere.is_dir()


def test_resuming_from_an_older_checkpoint_is_refused_while_newer_ones_of_the_run_stay(tmp_path):
    """train.resume=PATH naming a checkpoint older than the run's newest, of the run or a copy elsewhere (a backup
    a batch script names at every requeue): the continuation's new checkpoints were pruned as soon as written
    (pruning keeps the newest steps), and a later resume=auto went back to the old newest, past the new run's end.
    A copy outside the run was let through. Refused wherever it lies, naming the newer ones and both ways out (a
    copy under a name of its own by the step its state holds); the newest, or a newer one, is taken."""
    from vegan_scale.engine.resume import _choose
    from vegan_scale.rundir import RunDir

    run = RunDir(tmp_path / "run")
    for step in (5, 10, 15):
        save(run.checkpoints, step, keep_last_k=3)
    state = {"world_size": 1, "deepspeed": False}
    backup = save(tmp_path / "backup" / "checkpoints", 5, state={"step": 5, **state})
    renamed = backup.rename(backup.with_name("before-the-change"))
    for older in (run.checkpoints / "step_00000005", save(tmp_path / "other" / "checkpoints", 5), renamed):
        refused = _choose(str(older), run)
        assert "older than the run's newest checkpoints (step_00000010, step_00000015)" in str(refused), older
    assert _choose(str(run.checkpoints / "step_00000015"), run) == [str(run.checkpoints / "step_00000015")]
    newer = save(tmp_path / "other" / "checkpoints", 20)
    assert _choose(str(newer), run) == [str(newer)]


def test_checkpoints_newer_than_the_one_written_are_not_counted_for_pruning(tmp_path):
    """A run that fell back past a damaged newest checkpoint (step 30) writes older steps: with keep_last_k=1 the
    damaged one, sorting last, made every new checkpoint be pruned as soon as written, so the run kept nothing but
    the damage. Only checkpoints older than the one written are pruned."""
    for step in (10, 30):
        save(tmp_path, step, keep_last_k=5)
    for step in (11, 12):
        save(tmp_path, step, keep_last_k=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000012", "step_00000030"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000012"


def test_keep_last_k_prunes_oldest(tmp_path):
    """After five commits with keep_last_k=2 only the last two complete checkpoints remain, latest the newest."""
    for step in range(1, 6):
        save(tmp_path, step * 10, keep_last_k=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000040", "step_00000050"]
    assert (tmp_path / "latest").read_text().strip() == "step_00000050"


def test_keep_last_k_zero_keeps_the_newest(tmp_path):
    """keep_last_k=0 still keeps the checkpoint just published, so `latest` never names a deleted directory."""
    for step in (1, 2):
        save(tmp_path, step, keep_last_k=0)
    latest = (tmp_path / "latest").read_text().strip()
    assert latest == "step_00000002" and (tmp_path / latest / "COMPLETE").exists()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000002"]


def test_incomplete_checkpoints_not_listed(tmp_path):
    """A .tmp directory, a step directory without COMPLETE and stray files are ignored; order is by step."""
    assert complete_checkpoints(tmp_path / "absent") == []
    for step in (9, 10, 100):
        save(tmp_path, step, keep_last_k=10)
    (tmp_path / "step_00000200.tmp").mkdir()
    (tmp_path / "step_00000200.tmp" / "COMPLETE").write_text("")  # a crash between marker and rename
    (tmp_path / "step_00000300").mkdir()  # no marker
    (tmp_path / "step_00000400").write_text("a file")
    checkpoint.save_module(checkpoint.tmp_dir(tmp_path, 500), "autoencoder", {"w": torch.ones(1)}, {})  # uncommitted
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000009", "step_00000010", "step_00000100"]


def test_recommit_same_step_replaces(tmp_path):
    """Saving a step that already exists replaces it with the new content."""
    save(tmp_path, 7, modules={"autoencoder": ({"w": torch.zeros(2)}, {})})
    final = save(tmp_path, 7, modules={"autoencoder": ({"w": torch.ones(2)}, {})})
    assert torch.equal(read_module(final, "autoencoder")["w"], torch.ones(2))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000007"]


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_malicious_rank_state_refused(tmp_path, fmt):
    """A random-generator file replaced by a pickle that runs a shell command is refused by read_rank_state and
    runs nothing; an optimizer file replaced by one is not a safetensors file and is refused as damaged."""
    final = save(tmp_path, 1)
    marker = tmp_path / "pwned"
    evil = {"torch": RunsShell(marker)}
    payload = pickle.dumps(evil, protocol=2)
    if fmt == "torch.save":
        torch.save(evil, final / "rng_rank0.pt")
    else:
        (final / "rng_rank0.pt").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"refusing to load .*rng_rank0\.pt") as info:
        checkpoint.read_rank_state(final, 0)
    assert "weights_only" not in str(info.value)  # no advice to load it the unsafe way
    (final / "autoencoder.optim.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"autoencoder\.optim\.safetensors cannot be read"):
        read_optimizer(final, "autoencoder")
    assert not marker.exists()


def test_a_temporary_file_an_earlier_attempt_left_is_replaced_not_written_through(tmp_path):
    """Every file is written as NAME.tmp, then renamed. A NAME.tmp left as a pipe (storage damaged, a prank) held
    the writer in open() for ever (`eval` after all its metrics were computed); one left as a link was written
    through, into its target. It is removed first (in a process of its own, which a hang would not hold)."""
    import os
    import subprocess
    import sys

    outside = tmp_path / "outside.txt"
    outside.write_text("theirs")
    os.mkfifo(tmp_path / "eval.json.tmp")
    (tmp_path / "sizes.json.tmp").symlink_to(outside)
    script = (
        "import sys; from pathlib import Path; from vegan_scale import atomic\n"
        "for name in ('eval.json', 'sizes.json'): atomic.write_text(Path(sys.argv[1]) / name, name)"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=60)
    assert (tmp_path / "eval.json").read_text() == "eval.json" and (tmp_path / "sizes.json").read_text() == "sizes.json"
    assert outside.read_text() == "theirs" and not list(tmp_path.glob("*.tmp"))
