"""A file system that fills up under a run, with real processes: the trainer runs on a small tmpfs of its own (in
a private mount namespace, so no privileges are needed and nothing is left mounted), which holds the first
checkpoint but not the second, as a full disk or an exhausted quota on shared storage would."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.runkit import exit_status, run, same_weights, single, train_args

pytestmark = pytest.mark.distributed

SIZE = "15m"  # the runkit's WAE-GAN checkpoint is about 10 MB (the critic's weights and Adam state): one fits

# Mount a tmpfs of $1 bytes on $2, run the rest of the arguments there, copy what they left to $3, keep their code.
ON_A_SMALL_DISK = (
    'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 90; d=$2; o=$3; shift 3; "$@"; rc=$?; cp -a "$d"/. "$o"/; exit $rc'
)


def _namespaces_available() -> bool:
    unshare = shutil.which("unshare")
    return unshare is not None and subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _namespaces_available(), reason="unshare -rm (user and mount namespaces) is not permitted")
def test_a_full_disk_at_a_checkpoint_stops_the_run_cleanly_and_it_resumes_exactly(
    tiny_shards_module: Path, reference: Path, tmp_path: Path
) -> None:
    """The second checkpoint does not fit: the run stops with exit code 74 (not a traceback) and an error naming the
    checkpoint, the system's reason and what to do; the partial checkpoint is removed and the first one is intact;
    exit_status.json says so. Given room, train.resume=auto continues from the first checkpoint and ends with the
    weights of an uninterrupted run."""
    disk, kept = tmp_path / "disk", tmp_path / "root"
    disk.mkdir()
    kept.mkdir()
    trainer = single(train_args(tiny_shards_module, disk, "run"))
    proc = run(["unshare", "-rm", "sh", "-c", ON_A_SMALL_DISK, "sh", SIZE, str(disk), str(kept), *trainer])
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
