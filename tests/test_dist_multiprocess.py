"""Distributed math checked in two real processes over gloo against one process on the concatenated batch."""

from __future__ import annotations

import pytest

from tests.multiproc.harness import results_fixture

pytestmark = pytest.mark.distributed

CHECKS = [
    "global_mmd_float64",
    "global_mmd_float32",
    "global_mmd_parameter_grads_under_ddp",
    "one_step_wae_mmd_matches_one_process",
    "one_step_wae_gan_matches_one_process",
    "ranks_end_with_identical_parameters",
    "global_sliced_wasserstein_float64",
    "bf16_gradient_compression",
    "bf16_weights_copy_under_ddp",
]


results = results_fixture(CHECKS)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_global_mmd_equals_one_process_float64(results: dict, kernel: str) -> None:
    """Value and this rank's code gradients match the concatenated-batch estimator to 1e-9 (float64)."""
    for rank_result in results["global_mmd_float64"]:
        r = rank_result[kernel]
        assert r["dtype"] == "torch.float64"
        assert r["value_rel"] < 1e-9 and r["grad_rel"] < 1e-9


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_global_mmd_equals_one_process_float32(results: dict, kernel: str) -> None:
    """The same in float32, to 1e-4."""
    for rank_result in results["global_mmd_float32"]:
        r = rank_result[kernel]
        assert r["value_rel"] < 1e-4 and r["grad_rel"] < 1e-4


def test_global_penalty_parameter_gradients_survive_ddp_averaging(results: dict) -> None:
    """After DDP's gradient averaging, every parameter holds the one-process gradient of the global penalty."""
    for rank_result in results["global_mmd_parameter_grads_under_ddp"]:
        assert rank_result["value_rel"] < 1e-9 and rank_result["grad_rel"] < 1e-9


@pytest.mark.parametrize("recipe", ["one_step_wae_mmd_matches_one_process", "one_step_wae_gan_matches_one_process"])
def test_one_step_over_two_processes_equals_one_process(results: dict, recipe: str) -> None:
    """A global batch split in halves over 2 processes gives the parameters of the same step on the whole batch
    in 1 process (float64, SGD so that gradient scale errors show; a network without batch norm, whose statistics
    are per process)."""
    for rank_result in results[recipe]:
        for module, rel in rank_result.items():
            assert rel < 1e-9, f"{module} differs by {rel:g}"


def test_ranks_end_with_identical_parameters(results: dict) -> None:
    """After 20 WAE-GAN steps on different data, both ranks hold bit-identical auto-encoder and critic weights."""
    for rank_result in results["ranks_end_with_identical_parameters"]:
        assert rank_result["identical"] and rank_result["size"] > 100


def test_global_sliced_wasserstein_equals_one_process_float64(results: dict) -> None:
    """SWAE's global scope: two processes give one process's estimate on the concatenated batch, value and this
    rank's gradients to 1e-9 in float64, so lambda means the same at every world size."""
    for r in results["global_sliced_wasserstein_float64"]:
        assert r["value_rel"] < 1e-9 and r["grad_rel"] < 1e-9 and r["penalty_agrees"], r


def test_bf16_gradient_compression(results: dict) -> None:
    """train.grad_compression=bf16 puts the bf16 hook on the DDP module; the summed gradients differ from plain
    DDP's by bf16 rounding and by no more: each rank's share is rounded to bf16 (relative 2^-8 at most), then the
    sum is rounded again, so at most 2^-7 of the largest gradient."""
    for rank_result in results["bf16_gradient_compression"]:
        assert rank_result["hooks"] == ["bf16_allreduce_hook"]
        assert 0 < rank_result["rel"] <= 2**-7


def test_bf16_weights_copy_under_ddp(results: dict) -> None:
    """train.low_precision_weights under DDP: the bf16 copy's gradients are the mean of both ranks' (to bf16
    compute precision, 2^-5 of their norm, where a rank's own gradient differs from the mean by its whole size),
    the masters stay float32 and identical on both ranks, the copy is exactly the masters rounded to bf16 after
    each step, and batch norm is one float32 layer shared by both."""
    for r in results["bf16_weights_copy_under_ddp"]:
        assert r["grad_rel"] < 2**-5, r
        assert r["master_dtypes"] == ["torch.float32"] and r["copy_dtypes"] == ["torch.bfloat16", "torch.float32"]
        assert r["copy_is_rounded_master"] and r["norm_shared"] and r["ranks_agree"], r
        assert r["moved"] > 1e-3, r  # three steps of lr 1e-3 moved the masters
