"""Layers that compute what their torch.nn namesakes compute, faster where measurement showed a slow kernel."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same result) that computes a convolution with one output position as a
    single matrix product.

    Such a layer, the last of a DCGAN encoder (4x4 filters, stride 2, 3x3 input, 1x1 output), is a linear map of
    the input window. On CPU, oneDNN's backward pass for that shape ran at about a tenth of the matmul peak, 8x
    slower than the equivalent matrix product (bench/flops.py, docs/performance.md). Only the filter taps that meet
    the input are used; those that meet the zero padding get a zero gradient, as in the convolution.
    """

    def forward(self, x: Tensor) -> Tensor:
        window = self._single_output_window(x.shape[-2], x.shape[-1])
        if window is None:
            return super().forward(x)
        rows, cols = window
        top, left = self.padding
        taps = self.weight[:, :, top : top + rows, left : left + cols]
        out = F.linear(x[:, :, :rows, :cols].flatten(1), taps.flatten(1), self.bias)
        return out[:, :, None, None]

    def _single_output_window(self, height: int, width: int) -> tuple[int, int] | None:
        """(rows, columns) of the input the filter meets when the output is one position, else None."""
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            return None
        if any(d != 1 for d in self.dilation):
            return None
        window = []
        for size, k, s, p in zip((height, width), self.kernel_size, self.stride, self.padding, strict=True):
            if (size + 2 * p - k) // s + 1 != 1:
                return None
            window.append(max(0, min(size, k - p)))
        return window[0], window[1]
