"""Multi-process checks of distributed training math: the global MMD and its gradients under DDP."""

from __future__ import annotations

import torch

from tests.multiproc.harness import Context, check
from vegan_scale.models.outputs import LatentCodes
from vegan_scale.penalties.kernel_mmd import MMDPenalty, global_mmd, mmd


def _rank_data(ctx: Context, n: int, d: int, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's codes and prior samples, generated identically on every rank from one seed."""
    g = torch.Generator().manual_seed(7)
    codes = [torch.randn(n, d, generator=g, dtype=dtype) * 1.3 + 0.4 for _ in range(ctx.world_size)]
    prior = [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(ctx.world_size)]
    return codes, prior


def _global_vs_concatenated(ctx: Context, dtype: torch.dtype, kernel: str) -> dict:
    codes, prior = _rank_data(ctx, n=6, d=3, dtype=dtype)
    z = codes[ctx.rank].clone().requires_grad_(True)
    value = global_mmd(z, prior[ctx.rank], kernel, sigma2=1.5)
    (grad,) = torch.autograd.grad(value, z)
    z_all = torch.cat(codes).requires_grad_(True)  # one process's view of the whole global batch
    reference = mmd(z_all, torch.cat(prior), kernel, sigma2=1.5)
    (grad_all,) = torch.autograd.grad(reference, z_all)
    mine = grad_all[ctx.rank * 6 : (ctx.rank + 1) * 6]
    return {
        "value_rel": abs((value - reference) / reference).item(),
        "grad_rel": ((grad - mine).norm() / mine.norm()).item(),
        "dtype": str(value.dtype),
    }


@check
def global_mmd_float64(ctx: Context) -> dict:
    """global_mmd over 2 processes vs mmd of the concatenated batch in one process, float64, both kernels."""
    return {k: _global_vs_concatenated(ctx, torch.float64, k) for k in ("imq", "rbf")}


@check
def global_mmd_float32(ctx: Context) -> dict:
    """The same comparison in float32."""
    return {k: _global_vs_concatenated(ctx, torch.float32, k) for k in ("imq", "rbf")}


@check
def global_mmd_parameter_grads_under_ddp(ctx: Context) -> dict:
    """Parameter gradients through a DDP-wrapped encoder with the global penalty equal one process's gradients
    of the same penalty on the whole batch, although DDP averages gradients over processes."""
    n, d_in, d = 5, 4, 3
    g = torch.Generator().manual_seed(11)
    x = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for _ in range(ctx.world_size)]
    prior = [torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(ctx.world_size)]
    torch.manual_seed(3)
    encoder = torch.nn.Linear(d_in, d).double()
    reference = torch.nn.Linear(d_in, d).double()
    reference.load_state_dict(encoder.state_dict())
    wrapped = ctx.accelerator.prepare(encoder)
    penalty = MMDPenalty("imq", sigma2=1.0, scope="global")
    value = penalty(LatentCodes(z=wrapped(x[ctx.rank])), prior[ctx.rank])
    ctx.accelerator.backward(value)
    expected = mmd(reference(torch.cat(x)), torch.cat(prior), "imq", 1.0)
    expected.backward()
    rel = [
        ((p.grad - q.grad).norm() / q.grad.norm()).item()
        for p, q in zip(encoder.parameters(), reference.parameters(), strict=True)
    ]
    return {"value_rel": abs((value - expected) / expected).item(), "grad_rel": max(rel)}
