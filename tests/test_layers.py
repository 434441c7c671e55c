"""vegan_scale.models.layers against torch's own functional ops in float64: same values, same gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vegan_scale.models.layers import Conv2d

CASES = [  # (in, out, kernel, stride, padding, input side): the first three have one output position
    (5, 7, 4, 2, 1, 3),  # the DCGAN encoder's last layer: the filter meets a 3x3 input inside 1 row/column of padding
    (3, 4, 3, 1, 0, 3),  # the filter covers the input exactly
    (2, 3, 4, 3, 0, 5),  # the filter sees a 4x4 corner of a 5x5 input
    (3, 4, 4, 2, 1, 8),  # several output positions: the ordinary convolution
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("c_in", "c_out", "k", "s", "p", "side"), CASES)
def test_conv2d_equals_the_convolution(c_in, c_out, k, s, p, side, channels_last):
    torch.manual_seed(0)
    layer = Conv2d(c_in, c_out, k, s, padding=p).double()
    x = torch.randn(6, c_in, side, side, dtype=torch.float64)
    if channels_last:
        layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)

    out = layer(x)
    ref = F.conv2d(x_ref, weight, bias, s, p)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)

    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for mine, theirs in ((x.grad, x_ref.grad), (layer.weight.grad, weight.grad), (layer.bias.grad, bias.grad)):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
