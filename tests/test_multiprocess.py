"""Checks that need several real processes (gloo, CPU), all run by one launch of the multi-process harness."""

from __future__ import annotations

import pytest

from tests.multiproc.harness import results_fixture

pytestmark = pytest.mark.distributed

CHECKS = ["agreement_sees_one_ranks_flag", "float64_all_reduce_is_exact", "train_stream_ranks_equal_and_disjoint"]


results = results_fixture(CHECKS)


def test_agreement_reaches_every_rank(results: dict) -> None:
    """Flags raised on different ranks at different steps are seen by both ranks at the next check, each with the
    earliest step any rank raised it at; nothing is seen before."""
    for rank_result in results["agreement_sees_one_ranks_flag"]:
        assert rank_result["before"] == {}
        assert rank_result["after"] == {"1": 7}  # Flag.NONFINITE_PENALTY, first raised by rank 1 at step 7


def test_float64_collectives_are_exact(results: dict) -> None:
    """gloo all-reduce of float64 values matches the local float64 sum of every rank's values."""
    for rank_result in results["float64_all_reduce_is_exact"]:
        assert rank_result["max_abs_diff"] < 1e-15


def test_stream_equal_disjoint_complete_across_processes(results: dict) -> None:
    """Two processes read uneven shards: same batch count, no sample twice, read + dropped = all samples."""
    r0, r1 = results["train_stream_ranks_equal_and_disjoint"]
    assert r0["batches"] == r1["batches"] > 0
    assert len(r0["ids"]) == len(r1["ids"]) == 16 * r0["batches"]
    assert not set(r0["ids"]) & set(r1["ids"])
    assert len(set(r0["ids"])) == len(r0["ids"])
    assert len(r0["ids"]) + len(r1["ids"]) + r0["dropped"] == r0["total"]  # dropped counts every rank's leftover
