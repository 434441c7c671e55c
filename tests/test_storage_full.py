"""A file system that fills up under a run, with real processes: the trainer runs on a small tmpfs of its own (in
a private mount namespace, so no privileges are needed and nothing is left mounted), sized to hold the first
checkpoint but not the second, or the checkpoints but not the export, as a full disk or an exhausted quota on
shared storage would."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.runkit import ddp, exit_status, needs_namespaces, read_only, run, same_weights, single, train_args

pytestmark = pytest.mark.distributed

CHECKPOINT_ONLY = "15m"  # the runkit's WAE-GAN checkpoint is about 10 MB (the critic's weights and Adam state)
NO_EXPORT = "10100k"  # a 5-step run takes about 9,990 kB before its export, which takes about 210 kB

# Mount a tmpfs of $1 bytes on $2, take $4 bytes of it, run the rest of the arguments there, copy what they left to
# $3, keep their code.
ON_A_SMALL_DISK = (
    'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 90; head -c "$4" /dev/zero > "$2/.taken"; d=$2; o=$3; shift 4; '
    '"$@"; rc=$?; rm "$d/.taken"; cp -a "$d"/. "$o"/; exit $rc'
)


@needs_namespaces
def test_a_full_disk_at_a_checkpoint_stops_the_run_cleanly_and_it_resumes_exactly(
    tiny_shards_module: Path, reference: Path, tmp_path: Path
) -> None:
    """The second checkpoint does not fit: the run stops with exit code 74 (not a traceback) and an error naming the
    checkpoint, the system's reason and what to do; the partial checkpoint is removed and the first one is intact;
    exit_status.json says so. Given room, train.resume=auto continues from the first checkpoint and ends with the
    weights of an uninterrupted run."""
    kept = tmp_path / "root"
    proc = _on_a_small_disk(CHECKPOINT_ONLY, tmp_path, lambda disk: train_args(tiny_shards_module, disk, "run"))
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    run_dir = kept / "mnist" / "run"
    reason = exit_status(run_dir)["reason"]
    assert exit_status(run_dir)["code"] == 74
    for words in ("checkpoint step_00000010 could not be written", "No space left on device",
                  "step_00000005, is intact", "Free space there", "train.resume=auto"):  # fmt: skip
        assert words in reason and words in proc.stderr, (words, reason)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step_00000005"], checkpoints  # no partial step_00000010.tmp left behind
    assert (run_dir / "checkpoints" / "step_00000005" / "COMPLETE").is_file()

    again = run(single(train_args(tiny_shards_module, kept, "run")))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step_00000005 (step 5)" in again.stdout + again.stderr
    assert same_weights(run_dir / "export" / "model.safetensors", reference / "export" / "model.safetensors")
    assert exit_status(run_dir)["code"] == 0


@needs_namespaces
def test_a_full_disk_at_the_export_names_the_command_that_writes_it(tiny_shards_module: Path, tmp_path: Path) -> None:
    """The final checkpoint fits, the export does not: exit 74, the error names the export and the command that
    writes it once there is room, no partial export is left; that command then writes the final checkpoint's
    weights."""
    kept = tmp_path / "root"
    args = lambda disk: train_args(  # noqa: E731
        tiny_shards_module, disk, "run", "wae_gan", "train.max_steps=5", "tracking.backend=none"
    )
    proc = _on_a_small_disk(NO_EXPORT, tmp_path, args)
    assert proc.returncode == 74, proc.stderr[-3000:]
    run_dir, disk_run_dir = kept / "mnist" / "run", tmp_path / "disk" / "mnist" / "run"
    reason = exit_status(run_dir)["reason"]
    for words in ("the export could not be written", "No space left on device", "step_00000005, is intact",
                  f"vegan-scale export {disk_run_dir} --out {disk_run_dir / 'export'}"):  # fmt: skip
        assert words in reason and words in proc.stderr, (words, reason)
    assert not (run_dir / "export").exists()

    export = run(single(["-m", "vegan_scale", "export", str(run_dir), "--out", str(run_dir / "export")]))
    assert export.returncode == 0, export.stderr[-3000:]
    final = run_dir / "checkpoints" / "step_00000005" / "autoencoder.safetensors"
    assert same_weights(run_dir / "export" / "model.safetensors", final)


@needs_namespaces
@pytest.mark.parametrize("command", [["export"], ["sample", "--grid", "12"]])
def test_export_and_sample_on_a_full_disk_name_the_file_and_leave_no_part_of_it(
    command: list[str], reference: Path, tmp_path: Path
) -> None:
    """`vegan-scale export` and `sample` writing to a disk without room for their files: export's weights writer
    raised its own error (a traceback, exit 1), sample left a PNG of 0 bytes (or an earlier one cut short, beside
    new ones). Both stop with exit 74 naming the file and the system's reason, and every file they leave is
    whole."""
    verb, *options = command
    args = lambda disk: ["-m", "vegan_scale", verb, str(reference), "--out", str(disk / "out"), *options]  # noqa: E731
    proc = _on_a_small_disk("64k", tmp_path, args)
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    named = re.search(r"error: (\S+): No space left on device", proc.stderr)
    assert named and Path(named[1]).parent == tmp_path / "disk" / "out", proc.stderr[-3000:]
    left = sorted((tmp_path / "root" / "out").iterdir())
    assert not [p for p in left if p.suffix == ".tmp" or p.name == "model.safetensors"], left
    for png in left:
        with Image.open(png) as image:
            image.load()  # whole: a file cut short raises here


@needs_namespaces
def test_shards_on_a_full_disk_name_the_shard_and_leave_no_part_of_it(tmp_path: Path) -> None:
    """`vegan-scale shards` writing 1,000 images (800 kB) to a 256 kB disk: the tar writer's failure to write its
    last blocks came again while the partial shard was discarded (a traceback, exit 1, its .tar.tmp left behind).
    It stops with exit 74 naming the shard, and leaves no partial shard and no sizes.json."""
    images = np.random.default_rng(0).integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", images=images)
    source = str(tmp_path / "images.npz")
    args = lambda disk: ["-m", "vegan_scale", "shards", "npz", "--source", source, "--out", str(disk / "out"),  # noqa: E731
                         "--samples-per-shard", "100", "--workers", "1"]  # fmt: skip
    proc = _on_a_small_disk("256k", tmp_path, args)
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"error: \S+/out/train/npz-train-\d{6}\.tar: No space left on device", proc.stderr), proc.stderr
    left = [p.name for p in (tmp_path / "root" / "out").rglob("*") if p.is_file()]
    assert not [n for n in left if n.endswith(".tmp") or n == "sizes.json"], left


@needs_namespaces
def test_a_full_disk_at_a_checkpoint_of_two_processes_ends_the_job_at_once(
    tiny_shards_module: Path, tmp_path: Path
) -> None:
    """Under DDP (accelerate launch, 2 processes) the main process, which writes the checkpoint's files, stops with
    74 while the other waits for it: the launcher ends the job within seconds (no hang until the collective
    timeout), reporting 1 as launchers do, and exit_status.json holds 74 and the reason; no partial files."""
    proc = _on_a_small_disk(
        CHECKPOINT_ONLY, tmp_path, lambda disk: train_args(tiny_shards_module, disk, "run"), ddp, timeout=120
    )
    assert proc.returncode != 0
    run_dir = tmp_path / "root" / "mnist" / "run"
    assert exit_status(run_dir)["code"] == 74, proc.stderr[-3000:]
    assert "checkpoint step_00000010 could not be written" in exit_status(run_dir)["reason"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000005"]


# The tracking store's tables, then no room left on its disk: $1 the store made elsewhere, $2 the disk, $3 the run
# directory, then the trainer; after it, the room back and `vegan-scale sync` (the trainer's Python) run.
STORE_ON_A_FULL_DISK = (
    's=$1; d=$2; r=$3; shift 3; cp "$s" "$d/mlflow.db" || exit 91; head -c 64m /dev/zero > "$d/.fill" 2>/dev/null; '
    '"$@"; rc=$?; rm "$d/.fill"; "$1" -m vegan_scale sync "$r" || exit 92; exit $rc'
)


@needs_namespaces
def test_a_tracking_store_on_a_full_disk_is_one_line_and_sync_sends_the_run_later(
    tiny_shards_module: Path, tmp_path: Path
) -> None:
    """MLflow's sqlite store on a disk with no room left, the run directory elsewhere: training goes on to the end
    (exit 0); the console says why the store fails in one line ("database or disk is full", which MLflow's and
    SQLAlchemy's wrappers hide) and names the sync command, without MLflow's traceback at every retry; once there is
    room, that command sends the whole run, the model included, without MLflow's progress bars and warnings."""
    from mlflow.tracking import MlflowClient

    seed = tmp_path / "seed.db"
    MlflowClient(f"sqlite:///{seed}").search_experiments()  # creates the store's tables, where there is room
    disk, runs = tmp_path / "disk", tmp_path / "runs"
    run_dir = runs / "mnist" / "run"
    args = lambda disk: train_args(  # noqa: E731
        tiny_shards_module, runs, "run", "wae_mmd", "train.max_steps=10", "tracking.log_every=5",
        "tracking.backend=mlflow", f"tracking.uri=sqlite:///{disk}/mlflow.db", "tracking.close_timeout_s=3",
    )  # fmt: skip
    launch = lambda cmd: ["sh", "-c", STORE_ON_A_FULL_DISK, "sh", str(seed), str(disk), str(run_dir), *single(cmd)]  # noqa: E731
    proc = _on_a_small_disk("2m", tmp_path, args, launch)
    console = proc.stdout + proc.stderr
    assert proc.returncode == 0, console[-3000:]
    assert "fails (database or disk is full); training goes on" in proc.stdout, console[-3000:]
    assert f"vegan-scale sync {run_dir}" in proc.stdout
    for noise in ("Traceback", "Downloading artifacts", "input example"):  # nor, at sync, MLflow's own chatter
        assert noise not in console, (noise, console[-3000:])

    client = MlflowClient(f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}")  # the store, copied off the disk
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train/loss")] == [5, 10]


@needs_namespaces
def test_sync_of_a_run_directory_it_cannot_write_creates_no_run(tiny_shards_module: Path, tmp_path: Path) -> None:
    """`vegan-scale sync` of a run the server never saw, its directory on a read-only mount: the MLflow run was
    created, then keeping its id failed (exit 2, "mend or remove that file"), and every try left another run in the
    store, RUNNING for ever. It is refused before anything is created, as storage (74), saying what to do."""
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "runs"
    assert run(single(train_args(tiny_shards_module, runs, "ro", "wae_mmd", "train.max_steps=2"))).returncode == 0
    run_dir, store = runs / "mnist" / "ro", f"sqlite:///{tmp_path / 'mlflow.db'}"
    sync = single(["-m", "vegan_scale", "sync", str(run_dir), "--uri", store])
    for _ in range(2):
        proc = run([*read_only(run_dir), *sync], timeout=300)
        assert proc.returncode == 74, proc.stderr[-3000:]
        said = proc.stdout + proc.stderr
        assert "cannot be written" in said and "no MLflow run was created" in said, said[-3000:]
    client = MlflowClient(store)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert not (run_dir / "mlflow_run_id").exists()


def test_a_write_failing_on_one_process_stops_every_process_with_its_reason(
    tiny_shards_module: Path, tmp_path: Path
) -> None:
    """Under DDP, only the second process cannot write its part of a checkpoint (its random generators' state):
    here a file size limit of its own (``ulimit -f``, which SLURM carries from the submitting shell to the tasks),
    as a node-local quota or a storage error seen by one node would do. Every process stops with 74 and the same
    error, naming that process and the system's reason, and the main process removes the partial checkpoint (before,
    the failing process removed it from under the main process's writes, and the main process reported a peer that
    stopped answering); no checkpoint is left, this being the run's first."""
    limits = tmp_path / "limits"
    limits.mkdir()
    (limits / "sitecustomize.py").write_text(  # in every Python process started below; acts in rank 1's only
        "import os, resource\n"
        "if os.environ.get('RANK') == '1':\n"
        "    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
    )
    path = os.pathsep.join(filter(None, [str(limits), os.environ.get("PYTHONPATH")]))
    command = ["env", f"PYTHONPATH={path}", *ddp(train_args(tiny_shards_module, tmp_path, "run"))]
    proc = run(command, timeout=120)
    assert proc.returncode != 0
    run_dir = tmp_path / "mnist" / "run"
    reason = exit_status(run_dir)["reason"]
    assert exit_status(run_dir)["code"] == 74, proc.stderr[-3000:]
    for words in ("checkpoint step_00000005 could not be written", "process 1: ", "File too large", "rng_rank1.pt"):
        assert words in reason, (words, reason)
    assert "No such file or directory" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == []


@needs_namespaces
@pytest.mark.parametrize("free_kb", [4, 12, 24])
def test_a_disk_with_almost_no_room_names_the_file_it_could_not_write(
    free_kb: int, tiny_shards_module: Path, tmp_path: Path
) -> None:
    """A few kB left (a 1 MB tmpfs, the rest taken before the run): whichever small file fails first (train.log,
    the rank's heartbeat, metrics.jsonl, an evaluation figure: it depends on the room), the run stops with 74 and
    an error naming that file and the system's reason, never a traceback (train.log's own failure is one warning)."""
    args = lambda disk: train_args(  # noqa: E731
        tiny_shards_module, disk, "run", "wae_gan", "checkpoint.every_steps=0", "tracking.backend=none"
    )
    proc = _on_a_small_disk("1m", tmp_path, args, taken=1024 * (1024 - free_kb))
    disk = tmp_path / "disk"
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    named = re.search(r"error: (\S+) could not be written: No space left on device", proc.stderr)
    assert named and Path(named[1]).is_relative_to(disk / "mnist" / "run"), proc.stderr[-3000:]


def _on_a_small_disk(
    size: str,
    tmp_path: Path,
    args: Callable[[Path], list[str]],
    launch: Callable[[list[str]], list[str]] = single,
    timeout: float = 600,
    taken: int = 0,
) -> subprocess.CompletedProcess:
    """The trainer with ``args(disk)``, started by ``launch``, on a tmpfs of ``size`` at tmp_path/disk of which
    ``taken`` bytes are used before it starts; what it left is copied to tmp_path/root (the tmpfs goes with its
    namespace)."""
    disk, kept = tmp_path / "disk", tmp_path / "root"
    disk.mkdir()
    kept.mkdir()
    sizes = (size, str(disk), str(kept), str(taken))
    command = ["unshare", "-rm", "sh", "-c", ON_A_SMALL_DISK, "sh", *sizes, *launch(args(disk))]
    return run(command, timeout=timeout)
