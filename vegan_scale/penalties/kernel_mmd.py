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
* ``rbf``: k(x, y) = exp(-|x - y|^2 / C), a Gaussian kernel. Its bandwidth comes from the prior by default, so that
  the kernel does not depend on the batch it measures; ``bandwidth="median"`` is the official code's (and the
  paper's) median heuristic instead, C = 2 sigma_k^2 with sigma_k^2 the ((n^2 - n) / 2)-th largest squared
  distance between codes and prior samples plus the same of the codes among themselves, over the whole (global)
  batch. It is a constant of the batch: no gradient flows through it (TensorFlow's top_k, in the official code,
  passes one to the two distances it picks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vegan_scale.config.fields import Requirement, param
from vegan_scale.models.outputs import LatentCodes
from vegan_scale.noise import StepNoise
from vegan_scale.penalties.base import LatentPenalty, PenaltySpec
from vegan_scale.penalties.global_batch import all_gather_rows, scale_gradient, sum_over_processes, world_size
from vegan_scale.priors import Prior

IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
KERNELS = ("imq", "rbf")
BANDWIDTHS = ("prior", "median")


def mmd(z: Tensor, z_prior: Tensor, kernel: str = "imq", sigma2: float = 1.0, bandwidth: str = "prior") -> Tensor:
    """Unbiased estimate of MMD^2 between the rows of ``z`` [n, d] and ``z_prior`` [m, d] (n, m >= 2).

    1/(n(n-1)) sum_{i!=j} k(z_i, z_j) + 1/(m(m-1)) sum_{i!=j} k(p_i, p_j) - 2/(nm) sum_{i,j} k(z_i, p_j).
    It can be slightly negative when the two samples come from the same distribution.
    """
    _check(z, z_prior, kernel)
    c = median_constants(z, z_prior) if bandwidth == "median" else kernel_constants(kernel, z.shape[1], sigma2)
    n, m = len(z), len(z_prior)
    return (
        kernel_sum(z, z, kernel, c, diagonal=0) / (n * (n - 1))
        + kernel_sum(z_prior, z_prior, kernel, c, diagonal=0) / (m * (m - 1))
        - 2 * kernel_sum(z, z_prior, kernel, c) / (n * m)
    )


def global_mmd(
    z: Tensor, z_prior: Tensor, kernel: str = "imq", sigma2: float = 1.0, group: object = None, bandwidth: str = "prior"
) -> Tensor:
    """The unbiased MMD^2 of :func:`mmd` over the codes and prior samples of every process of ``group``.

    Every process passes its own ``z`` and ``z_prior`` (equally many rows on every process) and gets the same value:
    ``mmd`` of the concatenations, in rank order. Each process computes only the kernel rows of its own samples
    against all gathered ones (cost O(n N d) instead of O(N^2 d)), and the partial sums are added across processes.
    The gradient that reaches this process's ``z`` is exactly d MMD^2 / d z_local; the gathered copies of other
    processes' rows are constants, and the symmetry of k(z_i, z_j) accounts for their side of each pair.
    ``z_prior`` receives no gradient.
    """
    _check(z, z_prior, kernel)
    world = torch.distributed.get_world_size(group)
    rank = torch.distributed.get_rank(group)
    codes, prior = all_gather_rows(z.detach(), group), all_gather_rows(z_prior.detach(), group)
    c = median_constants(codes, prior) if bandwidth == "median" else kernel_constants(kernel, z.shape[1], sigma2)
    n, m = len(z), len(z_prior)
    big_n, big_m = n * world, m * world
    partial = (
        kernel_sum(z, codes, kernel, c, diagonal=rank * n, symmetric=True) / (big_n * (big_n - 1))
        + kernel_sum(z_prior.detach(), prior, kernel, c, diagonal=rank * m) / (big_m * (big_m - 1))
        - 2 * kernel_sum(z, prior, kernel, c) / (big_n * big_m)
    )
    return sum_over_processes(partial, group)


def _check(z: Tensor, z_prior: Tensor, kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"unknown MMD kernel {kernel!r}; expected one of {KERNELS}")
    if z.dim() != 2 or z_prior.dim() != 2 or z.shape[1] != z_prior.shape[1]:
        raise ValueError(
            f"mmd needs two [n, d] samples of one dimension, got {tuple(z.shape)} and {tuple(z_prior.shape)}"
        )
    if z.shape[0] < 2 or z_prior.shape[0] < 2:
        raise ValueError("the unbiased MMD estimate needs at least 2 samples on each side")


def median_constants(z: Tensor, z_prior: Tensor) -> tuple[float]:
    """The RBF constant C = 2 sigma_k^2 of the official median heuristic (see the module's docstring), computed
    without gradient from the codes ``z`` [n, d] and the prior sample ``z_prior``."""
    with torch.no_grad():
        dtype = _compute_dtype(z)
        z, z_prior = z.to(dtype), z_prior.to(dtype)
        half = (len(z) ** 2 - len(z)) // 2
        cross = _squared_distances(z, z_prior).flatten()
        within = _squared_distances(z, z).flatten()
        sigma2_k = sum(d.kthvalue(len(d) - half + 1).values for d in (cross, within))  # the half-th largest
    return (2.0 * float(sigma2_k),)


def kernel_constants(kernel: str, dim: int, sigma2: float) -> tuple[float, ...]:
    """The kernel's C values: one per IMQ scale, or the single RBF constant."""
    base = 2.0 * dim * sigma2
    return tuple(base * s for s in IMQ_SCALES) if kernel == "imq" else (base,)


def kernel_sum(
    x: Tensor,
    y: Tensor,
    kernel: str,
    constants: tuple[float, ...],
    *,
    diagonal: int | None = None,
    symmetric: bool = False,
) -> Tensor:
    """sum_{i,j} k(x_i, y_j), leaving out the pairs (i, diagonal + i) when ``diagonal`` is given.

    ``symmetric``: ``y`` holds ``x``'s rows (as a constant copy) among others, so each pair's other half,
    k(y_j, x_i), also depends on x; the gradient to x counts both halves.
    """
    return _KernelSum.apply(x, y, kernel, constants, diagonal, symmetric)


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


def _kernel_matrix(
    x: Tensor, y: Tensor, kernel: str, constants: tuple[float, ...], diagonal: int | None, slope: bool
) -> Tensor:
    k = _kernel_and_slope(_squared_distances(x, y), kernel, constants, slope)
    if diagonal is not None:
        k.diagonal(offset=diagonal).zero_()
    return k


class _KernelSum(torch.autograd.Function):
    """sum_{i,j} k(|x_i - y_j|^2), recomputing the distances in backward instead of storing n x m buffers."""

    @staticmethod
    def forward(
        ctx, x: Tensor, y: Tensor, kernel: str, constants: tuple[float, ...], diagonal: int | None, symmetric: bool
    ) -> Tensor:
        ctx.save_for_backward(x, y)
        ctx.args = (kernel, constants, diagonal)
        ctx.same, ctx.symmetric = x is y, symmetric
        dtype = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return _kernel_matrix(x.to(dtype), y.to(dtype), *ctx.args, slope=False).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, y = ctx.saved_tensors
        dtype = _compute_dtype(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            xc, yc = x.to(dtype), y.to(dtype)
            g = _kernel_matrix(xc, yc, *ctx.args, slope=True).mul_(2.0 * grad_out.to(dtype))
            # d|x_i - y_j|^2 / dx_i = 2 (x_i - y_j), and the negative of that for y_j. When x is y (or y holds a
            # copy of x's rows), each pair's other half contributes as much again to x's gradient.
            grad_x = grad_y = None
            if ctx.needs_input_grad[0]:
                grad_x = g.sum(dim=1, keepdim=True) * xc - g @ yc
                if ctx.same or ctx.symmetric:
                    grad_x = 2 * grad_x
            if ctx.needs_input_grad[1] and not ctx.same:
                grad_y = g.sum(dim=0).unsqueeze(1) * yc - g.T @ xc
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_y is None else grad_y.to(y.dtype),
            None,
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
    bandwidth: str = param(
        "prior",
        "RBF bandwidth: prior, from the prior's variance (a kernel independent of the batch); median, the official "
        "code's median heuristic over the (global) batch, for the paper's IMQ-against-RBF comparison.",
        choices=BANDWIDTHS,
    )
    scope: str = param(
        "global",
        "global: the estimator over the codes of all processes (the paper's estimator at the global batch; each "
        "process computes its rows against all, O(n N d)); local: each process's own batch only (O(n^2 d), a "
        "noisier estimate). With gradient accumulation, global means across processes within one micro-step.",
        choices=("global", "local"),
    )


class MMDPenalty(LatentPenalty):
    def __init__(self, kernel: str, sigma2: float, scope: str, bandwidth: str = "prior") -> None:
        self.kernel, self.sigma2, self.scope, self.bandwidth = kernel, sigma2, scope, bandwidth

    def describe(self) -> str:
        width = ", median bandwidth" if self.bandwidth == "median" else ""
        return f"mmd ({self.kernel} kernel{width}, {self.scope} MMD)"

    def __call__(self, codes: LatentCodes, z_prior: Tensor, noise: StepNoise | None = None) -> Tensor:
        world = world_size()
        if self.scope == "local" or world == 1:
            return mmd(codes.z, z_prior, self.kernel, self.sigma2, self.bandwidth)
        # Data-parallel training averages gradients over processes; this process's gradient is its share of the
        # global estimator's, so it is scaled by the world size for the average to be the exact gradient.
        value = global_mmd(codes.z, z_prior, self.kernel, self.sigma2, bandwidth=self.bandwidth)
        return scale_gradient(value, float(world))


def build(cfg: MMDConfig, prior: Prior, encoder: str) -> MMDPenalty:
    return MMDPenalty(cfg.kernel, prior.variance, cfg.scope, cfg.bandwidth)


SPEC = PenaltySpec(
    MMDConfig,
    build,
    "WAE-MMD: unbiased MMD^2 between the codes and a prior sample",
    rules=(Requirement("penalty.mmd.bandwidth", "median", "penalty.mmd.kernel", ("rbf",)),),
)
