"""Model evaluation in two real processes equals the evaluation of the whole set in one (this pytest process)."""

from __future__ import annotations

import pytest

from tests.multiproc.checks_eval import evaluate_tiny
from tests.multiproc.harness import results_fixture
from vegan_scale.evaluation.protocol import Shares

pytestmark = pytest.mark.distributed


every_check = results_fixture(["eval_over_two_processes"])


@pytest.fixture(scope="module")
def results(every_check: dict[str, list[dict]]) -> list[dict]:
    return every_check["eval_over_two_processes"]


def test_uneven_blocks_gather_in_order(results: list[dict]) -> None:
    for rank_result in results:
        assert rank_result["rows"] == [[float(i), float(i * i)] for i in range(7)]


def test_two_processes_give_the_whole_sets_metrics(results: list[dict]) -> None:
    """Every metric of both processes equals one process's over all images (features of a batch of 4 or of the
    whole block differ only in the last bits of float32 convolutions)."""
    single = evaluate_tiny(Shares())
    for rank_result in results:
        for side, expected in (("model", single.model), ("real", single.real)):
            assert rank_result[side].keys() == expected.keys()
            for key, value in expected.items():
                assert rank_result[side][key] == pytest.approx(value, rel=1e-5, abs=1e-7), f"{side} {key}"


def test_an_unwritable_eval_json_stops_every_process_before_the_evaluation(results: list[dict]) -> None:
    """The main process finds that eval.json cannot be written; every process raises, none waits in a gather."""
    main, other = (r["refusals"] for r in results)
    assert "a_file is not a directory); nothing was evaluated. Pass --out FILE" in main[0]
    assert "cannot be written (by the main process)" in other[0]
    assert main[1] is None and other[1] is None
