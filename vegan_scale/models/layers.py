"""Layers that compute what their torch.nn namesakes compute, faster where measurement shows a slow kernel.

On CPU, oneDNN's convolutions can run well below the matmul rate for the shipped networks' layers (most of all in
bf16 on a CPU with AMX; docs/performance.md). The layers here can write a convolution as one matrix product over
the filter's taps: a convolution gathers each output position's taps from the padded input and multiplies them by
the weight; a transposed convolution multiplies the input by the weight and sums each tap into its output
position. Gathering and summing taps are each other's adjoint (:class:`_Collect`, :class:`_Spread`), so each
pass is one product plus strided copies, in channels-last, the layout the next layer reads without a copy.

Which form is faster depends on the CPU and the layer: pythae's last decoder layer in float32 ran 2x faster as
products on an Intel CPU with AMX and 1.6x slower on an AMD CPU with AVX-512 BF16. So, as cuDNN's benchmark mode
does, a CPU layer times both forms at the first call of each signature (:func:`_products_pay`) and keeps the
faster; with deterministic algorithms asked for, a fixed rule decides instead. On GPUs (cuDNN) torch's kernels are
used, as they are for a geometry torch refuses (so that its error is raised). The two functions have no forward-mode
derivative or vmap rule: forward-mode AD, ``torch.func``'s transforms and TorchScript do not pass through the
product forms (vegan_scale applies none of them to these networks; ``torch.compile`` traces them).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Pair = tuple[int, int]
Form = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]  # (input, weight, bias) -> output
TAPS_PER_INPUT = 4  # a convolution's taps gathered are this many times its input at most (4x4 filters, stride 2)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same result) computed as a matrix product where that is faster.

    Where the filter meets the input once (one output position), on any device: the last layer of a DCGAN encoder
    (4x4 filters, stride 2, 3x3 input, 1x1 output) is a linear map of the zero-padded input window, and oneDNN's
    backward pass for that shape ran at about a tenth of the matmul peak (3.7-6x slower than the product on the
    AMD and Intel CPUs). The weight enters the product as a view in its own memory layout (contiguous or
    channels-last), so that neither pass copies anything the size of the weight, and the arithmetic is the
    convolution's, padding taps included.

    Elsewhere on CPU, the taps gathered into one product where they are at most ``TAPS_PER_INPUT`` times the input
    (a stride-1 layer's sixteen copies of its input cost more memory traffic than they save), if measured faster
    (:func:`_products_pay`; the fixed rule: in bf16, where pythae's encoder layers took 5, 40 and 25 ms forward
    and backward at batch 100 against 6-8, 56-60 and 125 ms in oneDNN's AMX kernels).
    """

    def forward(self, input: Tensor) -> Tensor:
        if not _plain(self, input):
            return super().forward(input)
        geometry = zip(input.shape[2:], self.padding, self.kernel_size, self.stride, strict=True)
        size = [(i + 2 * p - k) // s + 1 for i, p, k, s in geometry]  # the output's side
        if size == [1, 1]:  # the filter fits the padded input exactly once
            return self._window_product(input)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if input.device.type == "cpu" and kh * kw <= TAPS_PER_INPUT * sh * sw and min(size) > 0:  # else torch's
            products = partial(self._taps_product, size=size)
            if _products_pay(self, input, size, products, self._conv_forward, default=_in_bf16(input)):
                return products(input, self.weight, self.bias)
        return super().forward(input)

    def _window_product(self, x: Tensor) -> Tensor:
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        window = F.pad(x, (pw, pw, ph, ph))[:, :, :kh, :kw]  # what the filter meets, padding included
        weight = self.weight
        if weight.is_contiguous(memory_format=torch.channels_last):  # flatten both as (row, column, channel)
            window, weight = window.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1)
        return F.linear(window.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]

    def _taps_product(self, x: Tensor, weight: Tensor, bias: Tensor | None, size: list[int]) -> Tensor:
        n, (ph, pw) = x.shape[0], self.padding
        grid = F.pad(x.permute(0, 2, 3, 1), (0, 0, pw, pw, ph, ph))  # [n, H, W, C], zero-padded
        taps = _Collect.apply(grid, self.stride, size, self.kernel_size).flatten(3).flatten(0, 2)
        weight = weight.permute(0, 2, 3, 1).reshape(self.out_channels, -1)  # [out, (row, column, in)]
        return F.linear(taps, weight, bias).view(n, *size, self.out_channels).permute(0, 3, 1, 2)


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` (same parameters, same result) that, on CPU where measured faster, multiplies the
    input by every tap of the filter in one matrix product and sums the taps into the output.

    The fixed rule takes the products: pythae's decoder's first layer (1024 to 512 channels, batch 100, bf16,
    forward and backward, an Intel CPU with AMX) took 175-380 ms in oneDNN's kernel and 64-79 ms so, the second 167
    against 93 ms; float32 gained too. On an AMD CPU with AVX-512 BF16 the products won in bf16 (1.0-1.6x) but
    lost in float32 (0.6-1.0x). The taps are summed in float32 (or wider), so autocast's only added rounding is
    the product's output.
    """

    def forward(self, input: Tensor, output_size: list[int] | None = None) -> Tensor:
        if input.device.type != "cpu" or not _plain(self, input):
            return super().forward(input, output_size)
        geometry = (self.stride, self.padding, self.kernel_size, 2, self.dilation)
        extra = self._output_padding(input, output_size, *geometry)
        reach = [(i - 1) * s + k for i, s, k in zip(input.shape[2:], self.stride, self.kernel_size, strict=True)]
        size = [r - 2 * p + e for r, p, e in zip(reach, self.padding, extra, strict=True)]  # the output's side
        if min(size) < 1 or any(e >= s for e, s in zip(extra, self.stride, strict=True)):
            return super().forward(input, output_size)  # torch's error says what is wrong with the geometry

        def kernel(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
            return F.conv_transpose2d(x, weight, bias, self.stride, self.padding, extra, self.groups, self.dilation)

        form = partial(self._products, size=size)
        form = form if _products_pay(self, input, size, form, kernel, default=True) else kernel
        return form(input, self.weight, self.bias)

    def _products(self, x: Tensor, weight: Tensor, bias: Tensor | None, size: list[int]) -> Tensor:
        n, c, h, w = x.shape
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        reach = [(i - 1) * s + k for i, s, k in zip((h, w), self.stride, (kh, kw), strict=True)]  # what taps cover
        weight = weight.permute(0, 2, 3, 1).reshape(c, -1)  # [in, (row, column, out)]
        taps = x.permute(0, 2, 3, 1).reshape(n * h * w, c) @ weight
        taps = taps.view(n, h, w, kh, kw, self.out_channels)
        grid = [max(r, p + o) for r, p, o in zip(reach, self.padding, size, strict=True)]  # taps and output fit
        grid = _Spread.apply(taps, self.stride, grid)
        out = grid[:, ph : ph + size[0], pw : pw + size[1]]  # the padding cut away, as by torch
        out = out + bias if bias is not None else out
        return out.to(taps.dtype).permute(0, 3, 1, 2)


MEASURED: dict[tuple[Any, ...], bool] = {}  # a call's signature -> whether its product form was the faster
MAX_MEASURED = 256  # signatures measured per process; past them (ever-new batch sizes) the fixed rule decides
TIMED_CALLS = 3  # per form, after one untimed call, the two forms alternating; each form's fastest call counts


def _products_pay(layer: nn.Module, x: Tensor, size: list[int], products: Form, kernel: Form, default: bool) -> bool:
    """Whether a CPU layer computes this call as products (else torch's kernel): timed once per signature (the
    layer's geometry, the input's shape, type and layout, the weight's, autocast and grad mode), forward and, where
    a gradient is wanted, backward, on detached copies, so that no gradient, hook or random stream sees it.

    ``default`` (the fixed rule) decides where deterministic algorithms are asked for (a timing-made choice could
    differ between two runs, and their rounding with it), under ``torch.compile``'s tracing, and past
    ``MAX_MEASURED`` signatures.
    """
    if torch.are_deterministic_algorithms_enabled() or torch.compiler.is_compiling():
        return default
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")
    weight = layer.weight
    key = (type(layer), layer.extra_repr(), tuple(size), x.shape, x.stride(), x.dtype, weight.stride(), weight.dtype)
    key += (autocast, torch.is_grad_enabled())
    if key not in MEASURED:
        if len(MEASURED) >= MAX_MEASURED:
            return default
        best = _fastest_calls((products, kernel), (x, weight, layer.bias))
        MEASURED[key] = best[0] < best[1]
    return MEASURED[key]


def _fastest_calls(forms: Sequence[Form], tensors: tuple[Tensor, Tensor, Tensor | None]) -> list[float]:
    """Each form's fastest of ``TIMED_CALLS`` calls in seconds, forward and (where wanted) backward."""
    grad = torch.is_grad_enabled()
    x, weight, bias = (t.detach().requires_grad_(grad and t.requires_grad) if t is not None else None for t in tensors)
    wanted = [t for t in (x, weight, bias) if t is not None and t.requires_grad]
    best = [math.inf] * len(forms)
    for call in range(1 + TIMED_CALLS):
        for i, form in enumerate(forms):
            start = time.perf_counter()
            out = form(x, weight, bias)
            if wanted:
                torch.autograd.grad(out, wanted, torch.ones_like(out))
            if call:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


class _Spread(torch.autograd.Function):
    """Taps [n, h, w, kh, kw, C] summed into a grid [n, H, W, C]: tap (i, j) of position (y, x) lands on
    (y * stride + i, x * stride + j). In float32 or wider, whatever the taps' precision. Adjoint of _Collect."""

    @staticmethod
    def forward(ctx: Any, taps: Tensor, stride: Pair, size: Sequence[int]) -> Tensor:
        ctx.stride, ctx.positions, ctx.kernel, ctx.dtype = stride, taps.shape[1:3], taps.shape[3:5], taps.dtype
        return _spread(taps, stride, size)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _collect(grad, ctx.stride, ctx.positions, ctx.kernel, ctx.dtype), None, None


class _Collect(torch.autograd.Function):
    """Taps [n, h, w, kh, kw, C] read from a grid [n, H, W, C]: tap (i, j) of position (y, x) is the grid's
    (y * stride + i, x * stride + j). Adjoint of _Spread."""

    @staticmethod
    def forward(ctx: Any, grid: Tensor, stride: Pair, positions: Sequence[int], kernel: Pair) -> Tensor:
        ctx.stride, ctx.size, ctx.dtype = stride, grid.shape[1:3], grid.dtype
        return _collect(grid, stride, positions, kernel)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _spread(grad, ctx.stride, ctx.size).to(ctx.dtype), None, None, None


def _spread(taps: Tensor, stride: Pair, size: Sequence[int]) -> Tensor:
    """The taps summed into a new grid. Where the filter is at least its stride, taps (i, j) with i, j below the
    stride cover the grid's first h*stride rows and w*stride columns once each: they are copied there, and only
    the rest is zeroed before the other taps are added (10-25% faster than zeroing all and adding every tap)."""
    n, h, w, kh, kw, c = taps.shape
    (sh, sw) = stride
    grid = taps.new_empty((n, *size, c), dtype=torch.promote_types(taps.dtype, torch.float32))
    tiled = kh >= sh and kw >= sw
    if tiled:
        grid[:, h * sh :].zero_()
        grid[:, : h * sh, w * sw :].zero_()
    else:
        grid.zero_()
    for i in range(kh):
        for j in range(kw):
            target, tap = grid[:, _every(i, h, sh), _every(j, w, sw)], taps[:, :, :, i, j]
            if tiled and i < sh and j < sw:
                target.copy_(tap)
            else:
                target += tap
    return grid


def _collect(
    grid: Tensor, stride: Pair, positions: Sequence[int], kernel: Sequence[int], dtype: torch.dtype | None = None
) -> Tensor:
    """The taps, in ``dtype`` (the grid's by default): one copy from a strided view of every window (no
    full-size temporary: a float32 gradient's taps, then a bf16 copy of them, took 20 ms against 3.4 for the
    decoder's second layer; one copy per tap took 1.3-3.6x as long as this one)."""
    (h, w), (kh, kw) = positions, kernel
    windows = grid.unfold(1, kh, stride[0]).unfold(2, kw, stride[1])[:, :h, :w]  # [n, h, w, C, kh, kw], a view
    taps = grid.new_empty((grid.shape[0], h, w, kh, kw, grid.shape[3]), dtype=dtype)
    return taps.copy_(windows.permute(0, 1, 2, 4, 5, 3))


def _plain(layer: nn.Conv2d | nn.ConvTranspose2d, x: Tensor) -> bool:
    """Whether the product forms compute this layer: a batched input, and no groups, dilation or padding mode."""
    if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str) or x.dim() != 4:
        return False
    return all(d == 1 for d in layer.dilation)


def _in_bf16(x: Tensor) -> bool:
    """Whether a CPU layer's product runs in bf16: its input is (a bf16 weights copy), or autocast makes it so."""
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16 or autocast


def _every(first: int, count: int, stride: int) -> slice:
    """``count`` positions ``stride`` apart from ``first``."""
    return slice(first, first + (count - 1) * stride + 1, stride)
