"""Maximum mean discrepancy between Q_Z and P_Z: the WAE-MMD penalty.

``mmd`` is the unbiased U-statistic of MMD^2 (WAE paper, Algorithm 2; tolstikhin/wae ``mmd_penalty``). Each of
its three blocks is the mean of k over pairs of rows, computed by :class:`_KernelMean`, a custom autograd function:

* one squared-distance matrix per block (the matmul trick ``|x|^2 + |y|^2 - 2 x y^T``) serves every kernel scale;
* kernels are evaluated in float32 (float64 inputs stay float64) with autocast disabled, because the distance
  trick cancels badly in half precision;
* nothing of size n x m is kept for backward: the distances are recomputed there and the gradient is two matmuls,
  so memory is O(n m) transient and O((n + m) d) between forward and backward, whatever the number of scales.

Kernels (C = 2 * d * sigma2 = E|z - z'|^2 for two independent draws of a prior with per-coordinate variance sigma2):

* ``imq``: the multi-scale inverse multiquadratic of the WAE code, k(x, y) = sum_s C_s / (C_s + |x - y|^2) with
  C_s = C * s for s in IMQ_SCALES. Its heavy tails keep a gradient for codes far from the prior.
* ``rbf``: k(x, y) = exp(-|x - y|^2 / C), a Gaussian kernel whose bandwidth comes from the prior rather than the
  official code's median heuristic, so that the kernel does not depend on the batch it measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vegan_scale.config.fields import param
from vegan_scale.models.outputs import LatentCodes
from vegan_scale.penalties.base import LatentPenalty, PenaltySpec
from vegan_scale.priors import Prior

IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
KERNELS = ("imq", "rbf")


def mmd(z: Tensor, z_prior: Tensor, kernel: str = "imq", sigma2: float = 1.0) -> Tensor:
    """Unbiased estimate of MMD^2 between the rows of ``z`` [n, d] and ``z_prior`` [m, d] (n, m >= 2).

    1/(n(n-1)) sum_{i!=j} k(z_i, z_j) + 1/(m(m-1)) sum_{i!=j} k(p_i, p_j) - 2/(nm) sum_{i,j} k(z_i, p_j).
    It can be slightly negative when the two samples come from the same distribution.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown MMD kernel {kernel!r}; expected one of {KERNELS}")
    if z.dim() != 2 or z_prior.dim() != 2 or z.shape[1] != z_prior.shape[1]:
        raise ValueError(
            f"mmd needs two [n, d] samples of one dimension, got {tuple(z.shape)} and {tuple(z_prior.shape)}"
        )
    if z.shape[0] < 2 or z_prior.shape[0] < 2:
        raise ValueError("the unbiased MMD estimate needs at least 2 samples on each side")
    constants = kernel_constants(kernel, z.shape[1], sigma2)
    return (
        kernel_mean(z, z, kernel, constants, exclude_diagonal=True)
        + kernel_mean(z_prior, z_prior, kernel, constants, exclude_diagonal=True)
        - 2 * kernel_mean(z, z_prior, kernel, constants, exclude_diagonal=False)
    )


def kernel_constants(kernel: str, dim: int, sigma2: float) -> tuple[float, ...]:
    """The kernel's C values: one per IMQ scale, or the single RBF constant."""
    base = 2.0 * dim * sigma2
    return tuple(base * s for s in IMQ_SCALES) if kernel == "imq" else (base,)


def kernel_mean(x: Tensor, y: Tensor, kernel: str, constants: tuple[float, ...], *, exclude_diagonal: bool) -> Tensor:
    """Mean of k(x_i, y_j) over all pairs (i, j), or over i != j when ``exclude_diagonal`` (x and y the same sample)."""
    return _KernelMean.apply(x, y, kernel, constants, exclude_diagonal)


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _squared_distances(x: Tensor, y: Tensor) -> Tensor:
    sq = x.pow(2).sum(dim=1, keepdim=True) + y.pow(2).sum(dim=1)
    return sq.addmm_(x, y.T, alpha=-2.0).clamp_min_(0.0)


def _kernel_and_slope(d: Tensor, kernel: str, constants: tuple[float, ...], slope: bool) -> Tensor:
    """k(d) summed over the kernel's constants, or its derivative dk/dd when ``slope``; d is overwritten."""
    if kernel == "rbf":
        (c,) = constants
        k = d.mul_(-1.0 / c).exp_()
        return k.mul_(-1.0 / c) if slope else k
    out = torch.zeros_like(d)
    for c in constants:
        t = torch.add(d, c).reciprocal_()
        if slope:
            out.addcmul_(t, t, value=-c)
        else:
            out.add_(t, alpha=c)
    return out


def _pair_count(n: int, m: int, exclude_diagonal: bool) -> int:
    return n * (n - 1) if exclude_diagonal else n * m


class _KernelMean(torch.autograd.Function):
    """mean_{i,j} k(|x_i - y_j|^2), recomputing the distances in backward instead of storing n x m buffers."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, kernel: str, constants: tuple[float, ...], exclude_diagonal: bool):
        ctx.save_for_backward(x, y)
        ctx.kernel, ctx.constants, ctx.exclude_diagonal = kernel, constants, exclude_diagonal
        ctx.same = x is y
        dtype = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc, yc = x.detach().to(dtype), y.detach().to(dtype)
            k = _kernel_and_slope(_squared_distances(xc, yc), kernel, constants, slope=False)
            if exclude_diagonal:
                k.diagonal().zero_()
            return k.sum() / _pair_count(x.shape[0], y.shape[0], exclude_diagonal)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, y = ctx.saved_tensors
        dtype = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc, yc = x.to(dtype), y.to(dtype)
            g = _kernel_and_slope(_squared_distances(xc, yc), ctx.kernel, ctx.constants, slope=True)
            if ctx.exclude_diagonal:
                g.diagonal().zero_()
            g.mul_(2.0 * grad_out.to(dtype) / _pair_count(x.shape[0], y.shape[0], ctx.exclude_diagonal))
            # d|x_i - y_j|^2 / dx_i = 2 (x_i - y_j), and the negative of that for y_j. When x is y, g is symmetric
            # and both contributions are equal: one matmul, counted twice.
            grad_x = grad_y = None
            if ctx.same:
                grad_x = 2 * (g.sum(dim=1, keepdim=True) * xc - g @ xc)
            else:
                if ctx.needs_input_grad[0]:
                    grad_x = g.sum(dim=1, keepdim=True) * xc - g @ yc
                if ctx.needs_input_grad[1]:
                    grad_y = g.sum(dim=0).unsqueeze(1) * yc - g.T @ xc
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_y is None else grad_y.to(y.dtype),
            None,
            None,
            None,
        )


@dataclass
class MMDConfig:
    kernel: str = param(
        "imq",
        "Kernel of the MMD: multi-scale inverse multiquadratic or Gaussian (RBF); scales "
        "come from the prior's variance.",
        choices=KERNELS,
    )


class MMDPenalty(LatentPenalty):
    def __init__(self, kernel: str, sigma2: float) -> None:
        self.kernel, self.sigma2 = kernel, sigma2

    def __call__(self, codes: LatentCodes, z_prior: Tensor) -> Tensor:
        return mmd(codes.z, z_prior, self.kernel, self.sigma2)


def build(cfg: MMDConfig, prior: Prior, encoder: str) -> MMDPenalty:
    return MMDPenalty(cfg.kernel, prior.variance)


SPEC = PenaltySpec(MMDConfig, build, "WAE-MMD: unbiased MMD^2 between the codes and a prior sample")
