"""Layers that compute what their torch.nn namesakes compute, faster where measurement showed a slow kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same result) that computes a convolution with one output position as a
    single matrix product.

    Such a layer, the last of a DCGAN encoder (4x4 filters, stride 2, 3x3 input, 1x1 output), is a linear map of
    the zero-padded input window. On CPU, oneDNN's backward pass for that shape ran at about a tenth of the matmul
    peak, several times slower than the equivalent matrix product (bench/flops.py, docs/performance.md). The
    weight enters the product as a view in its own memory layout (contiguous or channels-last), so that neither
    pass copies anything the size of the weight, and the arithmetic is the convolution's, padding taps included.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self._single_output(x.shape[-2], x.shape[-1]):
            return super().forward(x)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        window = F.pad(x, (pw, pw, ph, ph))[:, :, :kh, :kw]  # what the filter meets, padding included
        weight = self.weight
        if weight.is_contiguous(memory_format=torch.channels_last):  # flatten both as (row, column, channel)
            window, weight = window.permute(0, 2, 3, 1), weight.permute(0, 2, 3, 1)
        return F.linear(window.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]

    def _single_output(self, height: int, width: int) -> bool:
        """Whether the filter fits the padded input exactly once (and nothing makes the product differ)."""
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return False
        if any(d != 1 for d in self.dilation):
            return False
        sizes = zip((height, width), self.kernel_size, self.stride, self.padding, strict=True)
        return all(size + 2 * p >= k and (size + 2 * p - k) // s == 0 for size, k, s, p in sizes)
