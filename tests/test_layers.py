"""vegan_scale.models.layers against torch's own functional ops in float64: same values, same gradients."""

from __future__ import annotations

import re
import time

import pytest
import torch
import torch.nn.functional as F

from vegan_scale.models import layers
from vegan_scale.models.layers import Conv2d, ConvTranspose2d

CASES = [  # (in, out, kernel, stride, padding, input side): the first three have one output position
    (5, 7, 4, 2, 1, 3),  # the DCGAN encoder's last layer: the filter meets a 3x3 input inside 1 row/column of padding
    (3, 4, 3, 1, 0, 3),  # the filter covers the input exactly
    (2, 3, 4, 3, 0, 5),  # the filter sees a 4x4 corner of a 5x5 input
    (3, 4, 4, 2, 1, 8),  # several output positions: the taps gathered into one product on CPU
    (3, 4, 3, 2, 0, 8),  # the input's last row and column meet no filter
    (2, 3, 2, 1, 1, 5),  # stride 1: every tap overlaps
]


def _forced(monkeypatch: pytest.MonkeyPatch, products: bool) -> None:
    """The product forms (or torch's kernels) wherever a layer may choose, whatever timing would say."""
    monkeypatch.setattr(layers, "_products_pay", lambda *args, **kwargs: products)


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("c_in", "c_out", "k", "s", "p", "side"), CASES)
def test_conv2d_equals_the_convolution(c_in, c_out, k, s, p, side, channels_last, product, monkeypatch):
    """Both ways, in float64: the taps gathered into one product, and torch's kernel (the filter meeting the
    input once is a product either way)."""
    _forced(monkeypatch, product)
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


TRANSPOSED = [  # (in, out, kernel, stride, padding, output padding, bias)
    (5, 7, 3, 2, 1, 0, True),  # pythae's decoder: 4x4 to 7x7
    (5, 7, 3, 2, 1, 1, True),  # pythae's decoder: 7x7 to 14x14
    (4, 3, 5, 2, 2, 1, False),  # the WAE paper's decoder: side doubled, no bias before batch norm
    (3, 2, 4, 2, 1, 0, True),  # taps that overlap by two
    (3, 2, 5, 1, 2, 0, True),  # stride 1: every tap overlaps
    (2, 3, 3, 3, 0, 2, True),  # stride above the kernel's reach: gaps, and an output padding past every tap
    (3, 4, (3, 5), (2, 1), (1, 2), (1, 0), True),  # rectangular everything
]


def _grads(out: torch.Tensor, grad: torch.Tensor, *tensors: torch.Tensor | None) -> list[torch.Tensor]:
    out.backward(grad)
    return [t.grad for t in tensors if t is not None]


@pytest.mark.parametrize("product", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("c_in", "c_out", "k", "s", "p", "extra", "bias"), TRANSPOSED)
def test_conv_transpose2d_equals_the_transposed_convolution(
    c_in, c_out, k, s, p, extra, bias, channels_last, product, monkeypatch
):
    _forced(monkeypatch, product)
    torch.manual_seed(0)
    layer = ConvTranspose2d(c_in, c_out, k, s, padding=p, output_padding=extra, bias=bias).double()
    x = torch.randn(3, c_in, 5, 6, dtype=torch.float64)  # not square: rows and columns kept apart
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    ref_x, ref_w = x.detach().clone().requires_grad_(True), layer.weight.detach().clone().requires_grad_(True)
    ref_b = layer.bias.detach().clone().requires_grad_(True) if bias else None

    out = layer(x)
    ref = F.conv_transpose2d(ref_x, ref_w, ref_b, s, p, extra)
    grad = torch.randn_like(ref)

    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    mine, theirs = _grads(out, grad, x, layer.weight, layer.bias), _grads(ref, grad, ref_x, ref_w, ref_b)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_conv_transpose2d_takes_the_output_size_and_autocast_as_torch_does(monkeypatch):
    """An ``output_size`` picks the output padding; under bf16 autocast the output is bf16 as torch's is, while
    the weights' gradients keep their float32."""
    _forced(monkeypatch, True)
    torch.manual_seed(0)
    layer = ConvTranspose2d(4, 3, 3, 2, padding=1)
    x = torch.randn(2, 4, 5, 5)
    out = layer(x, output_size=[10, 10])
    torch.testing.assert_close(out, F.conv_transpose2d(x, layer.weight, layer.bias, 2, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = layer(x), torch.nn.ConvTranspose2d.forward(layer, x)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.float(), rtol=0.02, atol=0.02)  # bf16's 8 bits of mantissa
    out.float().sum().backward()
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32


def test_an_empty_batch_passes_as_through_torch_s_layers(monkeypatch):
    """A batch of no samples (a last batch cut to nothing) gives the empty output of torch's shape, both ways."""
    _forced(monkeypatch, True)
    for layer, torch_layer, x in (
        (Conv2d(3, 4, 4, 2, padding=1), torch.nn.Conv2d, torch.randn(0, 3, 6, 6, requires_grad=True)),
        (
            ConvTranspose2d(3, 4, 3, 2, padding=1, output_padding=1),
            torch.nn.ConvTranspose2d,
            torch.randn(0, 3, 5, 5, requires_grad=True),
        ),
    ):
        out = layer(x)
        out.sum().backward()
        assert out.shape == torch_layer.forward(layer, x).shape and x.grad.shape == x.shape


@pytest.mark.parametrize(
    ("layer", "torch_layer", "shape"),
    [
        (Conv2d(3, 4, 4, stride=2), torch.nn.Conv2d, (2, 3, 2, 9)),  # the input smaller than the filter on one side
        (ConvTranspose2d(3, 4, 1, padding=1), torch.nn.ConvTranspose2d, (2, 3, 1, 1)),  # the padding takes it all
        (ConvTranspose2d(3, 4, 3, 2, padding=1, output_padding=2), torch.nn.ConvTranspose2d, (2, 3, 5, 5)),
    ],
)
def test_a_geometry_torch_refuses_is_refused_as_torch_does(layer, torch_layer, shape, monkeypatch):
    """Where torch's layer raises on a geometry (the last: an output padding past the stride), the product forms
    raise the same error instead of returning an empty or padded-out output."""
    _forced(monkeypatch, True)
    x = torch.randn(shape)
    with pytest.raises(RuntimeError) as theirs:
        torch_layer.forward(layer, x)
    with pytest.raises(RuntimeError, match=re.escape(str(theirs.value)[:40])):
        layer(x)


def test_the_input_is_named_as_torch_names_it():
    """``layer(input=x)``, as torch's layers take it."""
    x = torch.randn(2, 3, 5, 5)
    for layer in (Conv2d(3, 4, 4, 2, padding=1), ConvTranspose2d(3, 4, 3, 2, padding=1)):
        torch.testing.assert_close(layer(input=x), layer(x))


def _slowed(monkeypatch: pytest.MonkeyPatch, owner: type, name: str, calls: list[str]) -> None:
    """``owner.name`` made 20 ms slower, each call recorded."""
    original = getattr(owner, name)

    def slow(*args, **kwargs):
        calls.append(name)
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, slow)


@pytest.mark.parametrize("slow", ["kernel", "products"])
@pytest.mark.parametrize("transposed", [False, True])
def test_the_faster_form_is_measured_once_and_kept(slow, transposed, monkeypatch):
    """A CPU layer times both forms at its first call (of a signature) and computes with the faster from then
    on, whichever the fixed rule would pick; the timing calls touch no gradient and no random stream, and the
    result is the convolution's."""
    monkeypatch.setattr(layers, "MEASURED", {})
    layer = ConvTranspose2d(3, 4, 3, 2, padding=1) if transposed else Conv2d(3, 4, 4, 2, padding=1)
    reference = torch.nn.ConvTranspose2d.forward if transposed else torch.nn.Conv2d.forward
    calls: list[str] = []
    if slow == "kernel":
        _slowed(monkeypatch, F, "conv_transpose2d" if transposed else "conv2d", calls)
    else:
        _slowed(
            monkeypatch,
            ConvTranspose2d if transposed else Conv2d,
            "_products" if transposed else "_taps_product",
            calls,
        )
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    rng = torch.get_rng_state()

    outs = [layer(x) for _ in range(3)]
    assert len(calls) == 1 + layers.TIMED_CALLS  # the slow form timed at the first call, then never computed with
    assert layer.weight.grad is None and x.grad is None and torch.equal(torch.get_rng_state(), rng)
    calls.clear()
    for out in outs:
        torch.testing.assert_close(out, reference(layer, x), rtol=1e-5, atol=1e-5)


def test_deterministic_algorithms_take_the_fixed_rule_untimed(monkeypatch):
    """With deterministic algorithms asked for, no timing decides (two runs must round alike): the fixed rule,
    the products for a transposed layer and torch's kernel for a float32 convolution."""
    monkeypatch.setattr(layers, "MEASURED", {})
    calls: list[str] = []
    _slowed(monkeypatch, ConvTranspose2d, "_products", calls)
    _slowed(monkeypatch, F, "conv2d", calls)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    ConvTranspose2d(3, 4, 3, 2, padding=1)(torch.randn(2, 3, 5, 5))
    Conv2d(3, 4, 4, 2, padding=1)(torch.randn(2, 3, 6, 6))
    assert calls == ["_products", "conv2d"] and not layers.MEASURED
