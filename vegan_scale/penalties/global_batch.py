"""Estimators over the global batch: every process holds its rows, gets the estimate of the concatenation, and the
gradient of exactly its own rows.

Data-parallel training averages gradients over the W processes; a process's gradient of a global estimator is its
share of the whole, so the value is passed on with its gradient multiplied by W (:func:`scale_gradient`) and the
average is then the exact gradient of the global estimator.
"""

from __future__ import annotations

import torch
from torch import Tensor


def all_gather_rows(t: Tensor, group: object = None) -> Tensor:
    """Every process's ``t`` (equally many rows each), concatenated in rank order; no gradient flows through it."""
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def with_own_rows(local: Tensor, group: object = None) -> Tensor:
    """The global batch of ``local`` rows, with this process's own rows the differentiable ``local`` itself."""
    gathered, rank, n = all_gather_rows(local.detach(), group), torch.distributed.get_rank(group), len(local)
    return torch.cat([gathered[: rank * n], local, gathered[(rank + 1) * n :]])


class _SumOverProcesses(torch.autograd.Function):
    """Sum of a scalar over processes; backward passes the gradient through, since each process's partial sum
    depends only on its own rows."""

    @staticmethod
    def forward(ctx, partial: Tensor, group: object) -> Tensor:
        total = partial.detach().clone()
        torch.distributed.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def sum_over_processes(partial: Tensor, group: object = None) -> Tensor:
    """The sum of every process's ``partial`` (a scalar); its gradient reaches each process's own partial."""
    return _SumOverProcesses.apply(partial, group)


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return value.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


def scale_gradient(value: Tensor, factor: float) -> Tensor:
    """``value``, whose gradient is multiplied by ``factor`` on its way back (a global estimator's share)."""
    return _ScaleGradient.apply(value, factor)


def world_size() -> int:
    """The number of processes training together (1 without a process group)."""
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
