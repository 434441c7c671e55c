"""The data pipeline in two real processes (gloo, CPU), all checks run by one launch of the multi-process harness."""

from __future__ import annotations

import pytest

from tests.multiproc.harness import results_fixture

pytestmark = pytest.mark.distributed

CHECKS = [
    "data_epoch_two_ranks_two_workers",
    "data_resampled_two_ranks_two_workers",
    "data_resume_per_rank",
    "data_train_on_error_raise",  # the training checks last: a run that fails there leaves nothing behind
    "data_train_on_error_skip",
    "data_train_damaged_header_raise",
    "data_train_damaged_header_skip",
]


results = results_fixture(CHECKS, timeout=240)


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_two_processes_train_on_the_global_batches_of_one(results: dict, mode: str) -> None:
    """At every step, rank 0's batch then rank 1's (2 loader workers each) is the global batch that one process
    without loader workers reads."""
    r0, r1 = results[f"data_{mode}_two_ranks_two_workers"]
    assert [a + b for a, b in zip(r0["batch_ids"], r1["batch_ids"], strict=True)] == r0["one_process_ids"]


def test_epoch_mode_equal_disjoint_complete(results: dict) -> None:
    """2 processes x 2 loader workers, uneven shards: the same number of full batches on each rank, no sample
    read twice, and read + dropped = every sample."""
    r0, r1 = results["data_epoch_two_ranks_two_workers"]
    assert r0["batches"] == r1["batches"] == 345 // 20
    assert r0["dropped"] == 345 - 17 * 20
    for r in (r0, r1):
        assert len(r["batch_ids"]) == r["batches"] and all(len(b) == 10 for b in r["batch_ids"])
        assert r["labels_ok"]
    ids0 = [i for b in r0["batch_ids"] for i in b]
    ids1 = [i for b in r1["batch_ids"] for i in b]
    assert len(set(ids0 + ids1)) == len(ids0) + len(ids1)
    assert len(ids0) + len(ids1) + r0["dropped"] == r0["total"]


def test_resampled_mode_equal_batch_counts(results: dict) -> None:
    """Resampled mode: every rank yields batches_per_epoch full batches of real samples."""
    for r in results["data_resampled_two_ranks_two_workers"]:
        assert len(r["batch_ids"]) == r["batches"] == 17
        assert all(len(b) == 10 for b in r["batch_ids"])
        assert set(i for b in r["batch_ids"] for i in b) <= set(range(345))
        assert r["labels_ok"]


def test_resume_per_rank(results: dict) -> None:
    """In each process and mode, epoch(e, start=j) equals epoch(e)[j:] exactly."""
    for rank_result in results["data_resume_per_rank"]:
        assert rank_result == {f"{m}/{j}": True for m in ("epoch", "resampled") for j in (1, 2, 5, 16)}


def test_training_stops_together_on_bad_data(results: dict) -> None:
    """data.on_error=raise: rank 1's undecodable image stops both ranks with a DataError naming the shard."""
    r0, r1 = results["data_train_on_error_raise"]
    for r in (r0, r1):
        assert r["type"] == "DataError" and r["is_data_error"], r
        assert r["poisoned"] in r["message"] and "cannot decode" in r["message"], r["message"]
        assert "process 1" in r["message"] and r["seconds"] < 120
    assert r0["message"] == r1["message"]
    assert r0["exit"] == 2


def test_training_skips_bad_data(results: dict) -> None:
    """data.on_error=skip: both ranks finish, and the metrics count the one skipped image over all ranks."""
    r0, r1 = results["data_train_on_error_skip"]
    assert r0["error"] is None and r1["error"] is None
    assert r0["skipped"] == 1 and r0["skip_keys"] == ["data/skipped/undecodable_image"]
    assert r0["last_step"] == 10 and r0["exit"] == 0


def test_damaged_tar_header_stops_both_ranks_naming_shard_and_offset(results: dict) -> None:
    """data.on_error=raise: a tar header in rank 1's shard whose size runs past the file stops both ranks with the
    shard and the byte offset named (exit 2), not an OverflowError or MemoryError."""
    r0, r1 = results["data_train_damaged_header_raise"]
    for r in (r0, r1):
        assert r["is_data_error"] and r["poisoned"] in r["message"], r
        assert "at byte" in r["message"] and "process 1" in r["message"] and r["seconds"] < 120, r["message"]
    assert r0["message"] == r1["message"] and r0["exit"] == 2


def test_damaged_tar_header_is_skipped_and_counted(results: dict) -> None:
    """data.on_error=skip: the 19 samples the damaged header (sample 7's image, of 25) costs are counted: the rest
    of the shard, and sample 6, whose members the damaged header might have continued."""
    r0, r1 = results["data_train_damaged_header_skip"]
    assert r0["error"] is None and r1["error"] is None
    assert r0["skipped"] == 19 and r0["skip_keys"] == ["data/skipped/corrupt_shard"]
    assert r0["last_step"] == 10 and r0["exit"] == 0
