"""Maximum mean discrepancy between Q_Z and P_Z: the WAE-MMD penalty.

``mmd`` is the unbiased U-statistic of MMD^2 (WAE paper, Algorithm 2; tolstikhin/wae ``mmd_penalty``), a weighted
sum of the kernel over three blocks of pairs (codes, prior samples, codes against prior samples), computed by
:func:`kernel_sums` (a custom autograd function):

* one squared-distance matrix per block (the matmul trick ``|x|^2 + |y|^2 - 2 x y^T``) serves every kernel scale;
* kernels are evaluated in float32 (float64 inputs stay float64) with autocast disabled, because the distance
  trick cancels badly in half precision;
* at a training batch (up to SMALL pairs in all) the blocks share one buffer, so each kernel scale is one
  operation, and the forward keeps the kernel's slope (one float per pair) for the backward;
* above that, each block is evaluated alone and nothing of size n x m is kept for backward: the distances are
  recomputed there and the gradient is two matmuls, so memory is O(n m) transient and O((n + m) d) between
  forward and backward, whatever the number of scales.

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

from vegan_scale.models.outputs import LatentCodes
from vegan_scale.noise import StepNoise
from vegan_scale.penalties.base import LatentPenalty
from vegan_scale.penalties.global_batch import all_gather_rows, scale_gradient, sum_over_processes, world_size
from vegan_scale.penalties.options import KERNELS, MMDConfig
from vegan_scale.priors import Prior

IMQ_SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def mmd(z: Tensor, z_prior: Tensor, kernel: str = "imq", sigma2: float = 1.0, bandwidth: str = "prior") -> Tensor:
    """Unbiased estimate of MMD^2 between the rows of ``z`` [n, d] and ``z_prior`` [m, d] (n, m >= 2).

    1/(n(n-1)) sum_{i!=j} k(z_i, z_j) + 1/(m(m-1)) sum_{i!=j} k(p_i, p_j) - 2/(nm) sum_{i,j} k(z_i, p_j).
    It can be slightly negative when the two samples come from the same distribution.
    """
    _check(z, z_prior, kernel)
    c = median_constants(z, z_prior) if bandwidth == "median" else kernel_constants(kernel, z.shape[1], sigma2)
    n, m = len(z), len(z_prior)
    blocks = (Block(0, 0, 1 / (n * (n - 1)), diagonal=0), Block(1, 1, 1 / (m * (m - 1)), diagonal=0),
              Block(0, 1, -2 / (n * m)))  # fmt: skip
    return kernel_sums((z, z_prior), blocks, kernel, c)


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
    blocks = (
        Block(0, 1, 1 / (big_n * (big_n - 1)), diagonal=rank * n, symmetric=True),
        Block(2, 3, 1 / (big_m * (big_m - 1)), diagonal=rank * m),
        Block(0, 3, -2 / (big_n * big_m)),
    )
    partial = kernel_sums((z, codes, z_prior.detach(), prior), blocks, kernel, c)
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


@dataclass(frozen=True)
class Block:
    """weight * sum_{i,j} k(a_i, b_j) for a = tensors[left], b = tensors[right] of :func:`kernel_sums`.

    ``diagonal``: the pairs (i, diagonal + i) are left out. ``symmetric``: ``b`` holds ``a``'s rows (as a constant
    copy) among others, so each pair's other half, k(b_j, a_i), also depends on ``a``: the gradient to ``a`` counts
    both halves. A block with ``left == right`` (one tensor on both sides) gets both halves as well.
    """

    left: int
    right: int
    weight: float
    diagonal: int | None = None
    symmetric: bool = False


SMALL = 1 << 20  # pairs (4 MiB of float32) up to which all blocks share one pass and the slope is kept


def kernel_sums(
    tensors: tuple[Tensor, ...], blocks: tuple[Block, ...], kernel: str, constants: tuple[float, ...]
) -> Tensor:
    """The sum over ``blocks`` of their weighted kernel sums, differentiable in every tensor.

    At a training batch the cost is the number of operations, not their arithmetic (a hundred codes: 10,000 pairs
    a block), so up to SMALL pairs in all the blocks are evaluated together: their distances are laid out in one
    buffer, each kernel scale is one operation over all of them, and the forward keeps the kernel's slope for the
    backward. Above that, each block is a pass of its own and the backward recomputes its distances instead of
    storing them: memory between forward and backward is the inputs only, and three buffers of the largest block
    during either.
    """
    small = sum(len(tensors[b.left]) * len(tensors[b.right]) for b in blocks) <= SMALL
    return _KernelSums.apply(kernel, constants, blocks, small, *tensors)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _squared_distances(x: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
    """|x_i - y_j|^2 for all pairs, into ``out`` when given."""
    sq = torch.add(x.pow(2).sum(dim=1, keepdim=True), y.pow(2).sum(dim=1), out=out)
    return sq.addmm_(x, y.T, alpha=-2.0).clamp_min_(0.0)


def _kernel_and_slope(
    d: Tensor, kernel: str, constants: tuple[float, ...], value: bool, slope: bool
) -> tuple[Tensor | None, Tensor | None]:
    """k(d) summed over the kernel's constants and its derivative dk/dd, each only if asked; d is overwritten."""
    if kernel == "rbf":
        (c,) = constants
        k = d.mul_(-1.0 / c).exp_()
        if not slope:
            return k, None
        return (k, k * (-1.0 / c)) if value else (None, k.mul_(-1.0 / c))
    k = torch.zeros_like(d) if value else None
    s = torch.zeros_like(d) if slope else None
    for c in constants:
        r = torch.add(d, c).reciprocal_()
        if k is not None:
            k.add_(r, alpha=c)
        if s is not None:
            s.addcmul_(r, r, value=-c)
    return k, s


def _kernel_blocks(
    xs: list[Tensor], blocks: tuple[Block, ...], kernel: str, constants: tuple[float, ...], value: bool, slope: bool
) -> tuple[list[Tensor] | None, list[Tensor] | None]:
    """k and dk/dd (each only if asked) of each block of pairs, its left-out pairs zero: views of one buffer."""
    shapes = [(len(xs[b.left]), len(xs[b.right])) for b in blocks]
    sizes = [a * b for a, b in shapes]
    d = torch.empty(sum(sizes), dtype=xs[0].dtype, device=xs[0].device)
    for flat, block, shape in zip(d.split(sizes), blocks, shapes, strict=True):
        _squared_distances(xs[block.left], xs[block.right], out=flat.view(shape))
    out = []
    for buffer in _kernel_and_slope(d, kernel, constants, value, slope):
        if buffer is None:
            out.append(None)
            continue
        views = [flat.view(shape) for flat, shape in zip(buffer.split(sizes), shapes, strict=True)]
        for view, block in zip(views, blocks, strict=True):
            if block.diagonal is not None:
                view.diagonal(offset=block.diagonal).zero_()
        out.append(views)
    return out[0], out[1]


class _KernelSums(torch.autograd.Function):
    """The weighted kernel sums of :func:`kernel_sums`; inputs: the kernel, its constants, the blocks, whether they
    are small (one pass, the slope kept), then the tensors."""

    @staticmethod
    def forward(
        ctx, kernel: str, constants: tuple[float, ...], blocks: tuple[Block, ...], small: bool, *tensors: Tensor
    ) -> Tensor:
        ctx.args, ctx.tensors = (kernel, constants, blocks), len(tensors)
        keep = small and any(t.requires_grad for t in tensors)
        kept: list[Tensor] = []
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            xs = [t.to(_compute_dtype(*tensors)) for t in tensors]
            if small:
                values, slopes = _kernel_blocks(xs, blocks, kernel, constants, value=True, slope=keep)
                total = _weighted_sum(blocks, values)
                kept = slopes if keep else []
            else:  # a block at a time, each one's buffers freed before the next
                total = sum(
                    _weighted_sum((b,), _kernel_blocks(xs, (b,), kernel, constants, value=True, slope=False)[0])
                    for b in blocks
                )
        ctx.save_for_backward(*tensors, *kept)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        saved = ctx.saved_tensors
        tensors, kept = saved[: ctx.tensors], saved[ctx.tensors :]
        kernel, constants, blocks = ctx.args
        wanted = ctx.needs_input_grad[4:]
        grads: list[Tensor | None] = [None] * len(tensors)
        with torch.autocast(device_type=tensors[0].device.type, enabled=False):
            xs = [t.to(_compute_dtype(*tensors)) for t in tensors]
            scale = 2.0 * grad_out.to(xs[0].dtype)  # d|x_i - y_j|^2 / dx_i = 2 (x_i - y_j); -2 (x_i - y_j) for y_j
            for i, b in enumerate(blocks):
                if not (wanted[b.left] or wanted[b.right]):
                    continue
                if kept:
                    g = kept[i] * (scale * b.weight)
                else:  # recomputed, worked on in place
                    g = _kernel_blocks(xs, (b,), kernel, constants, value=False, slope=True)[1][0].mul_(
                        scale * b.weight
                    )
                if wanted[b.left]:
                    halves = 2 if b.left == b.right or b.symmetric else 1
                    _add(grads, b.left, (g.sum(dim=1, keepdim=True) * xs[b.left] - g @ xs[b.right]) * halves)
                if wanted[b.right] and b.left != b.right:
                    _add(grads, b.right, g.sum(dim=0).unsqueeze(1) * xs[b.right] - g.T @ xs[b.left])
                del g  # one block's buffer at a time
        grads = [g if g is None else g.to(t.dtype) for g, t in zip(grads, tensors, strict=True)]
        return (None, None, None, None, *grads)


def _weighted_sum(blocks: tuple[Block, ...], values: list[Tensor]) -> Tensor:
    return sum(b.weight * v.sum() for b, v in zip(blocks, values, strict=True))


def _add(grads: list[Tensor | None], index: int, value: Tensor) -> None:
    grads[index] = value if grads[index] is None else grads[index] + value


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
