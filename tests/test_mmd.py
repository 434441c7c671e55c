"""The WAE-MMD penalty against a float64 double-loop reference of the unbiased U-statistic."""

from __future__ import annotations

import math

import pytest
import torch

from vegan_scale.models.outputs import LatentCodes
from vegan_scale.penalties import kernel_mmd
from vegan_scale.penalties.kernel_mmd import mmd
from vegan_scale.penalties.options import MMDConfig
from vegan_scale.priors import Prior

SCALES = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


def naive_kernel(x, y, kernel, sigma2):
    """k(x, y) for two vectors, written from the kernel's formula."""
    d = x.shape[0]
    dist2 = ((x - y) ** 2).sum()
    base = 2.0 * d * sigma2
    if kernel == "rbf":
        return torch.exp(-dist2 / base)
    return sum(base * s / (base * s + dist2) for s in SCALES)


def naive_mmd(z, p, kernel="imq", sigma2=1.0):
    """The unbiased MMD^2 U-statistic with explicit double loops (differentiable through autograd)."""
    n, m = z.shape[0], p.shape[0]
    kzz = sum(naive_kernel(z[i], z[j], kernel, sigma2) for i in range(n) for j in range(n) if i != j)
    kpp = sum(naive_kernel(p[i], p[j], kernel, sigma2) for i in range(m) for j in range(m) if i != j)
    kzp = sum(naive_kernel(z[i], p[j], kernel, sigma2) for i in range(n) for j in range(m))
    return kzz / (n * (n - 1)) + kpp / (m * (m - 1)) - 2.0 * kzp / (n * m)


def samples(n, m, d, dtype=torch.float64, seed=0, shift=0.5):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, d, generator=g, dtype=torch.float64) * 1.3 + shift).to(dtype)
    p = torch.randn(m, d, generator=g, dtype=torch.float64).to(dtype)
    return z, p


def value_and_grads(fn, z, p, **kw):
    z, p = z.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    value = fn(z, p, **kw)
    gz, gp = torch.autograd.grad(value, (z, p))
    return value.detach(), gz, gp


@pytest.fixture(params=["one pass", "a pass per block"])
def passes(request, monkeypatch):
    """Both ways of evaluating the blocks: together, the slope kept (small batches), or one block at a time, the
    distances recomputed in backward (above kernel_mmd.SMALL pairs)."""
    if request.param == "a pass per block":
        monkeypatch.setattr(kernel_mmd, "SMALL", 0)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
@pytest.mark.parametrize(("n", "m", "d", "sigma2"), [(7, 5, 1, 1.0), (6, 9, 3, 0.5), (10, 4, 8, 2.0), (2, 3, 2, 1.0)])
def test_value_and_gradients_match_float64_double_loop(kernel, n, m, d, sigma2, passes):
    """Value and both input gradients equal the autograd of a float64 double-loop U-statistic."""
    z, p = samples(n, m, d, seed=n * 100 + m * 10 + d)
    v, gz, gp = value_and_grads(mmd, z, p, kernel=kernel, sigma2=sigma2)
    rv, rgz, rgp = value_and_grads(naive_mmd, z, p, kernel=kernel, sigma2=sigma2)
    assert v.dtype == torch.float64
    torch.testing.assert_close(v, rv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gz, rgz, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gp, rgp, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_gradcheck(kernel, passes):
    """torch.autograd.gradcheck: analytic backward against finite differences, both inputs."""
    z, p = samples(5, 4, 3, seed=3)
    z.requires_grad_()
    p.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mmd(a, b, kernel, 0.7), (z, p))


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_one_tensor_on_both_sides(kernel, passes):
    """mmd(z, z) and mmd(w[:n], w[n:]) match the double-loop reference, gradients accumulated through autograd."""
    z, _ = samples(6, 2, 3, seed=4)
    v, g = _value_grad_one(lambda t: mmd(t, t, kernel), z)
    rv, rg = _value_grad_one(lambda t: naive_mmd(t, t, kernel), z)
    torch.testing.assert_close(v, rv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-14)

    w, _ = samples(11, 2, 2, seed=5)
    v, g = _value_grad_one(lambda t: mmd(t[:5], t[5:], kernel), w)
    rv, rg = _value_grad_one(lambda t: naive_mmd(t[:5], t[5:], kernel), w)
    torch.testing.assert_close(v, rv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-14)


def _value_grad_one(fn, t):
    t = t.detach().clone().requires_grad_()
    value = fn(t)
    (g,) = torch.autograd.grad(value, t)
    return value.detach(), g


def test_gradient_only_for_the_input_that_needs_it():
    """A prior sample without requires_grad gets no gradient; the codes' gradient still matches the reference."""
    z, p = samples(6, 5, 3, seed=6)
    z.requires_grad_()
    mmd(z, p).backward()
    zr = z.detach().clone().requires_grad_()
    naive_mmd(zr, p).backward()
    assert p.grad is None
    torch.testing.assert_close(z.grad, zr.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_float32_inputs_match_float64_reference(kernel):
    """Float32 inputs: value and gradients agree with the float64 reference on the same numbers to ~1e-5."""
    z32, p32 = samples(12, 10, 4, dtype=torch.float32, seed=7, shift=1.0)
    v, gz, gp = value_and_grads(mmd, z32, p32, kernel=kernel)
    rv, rgz, rgp = value_and_grads(naive_mmd, z32.double(), p32.double(), kernel=kernel)
    assert v.dtype == gz.dtype == gp.dtype == torch.float32
    torch.testing.assert_close(v.double(), rv, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gz.double(), rgz, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gp.double(), rgp, rtol=1e-4, atol=1e-6)


def test_bfloat16_autocast_computes_in_float32():
    """Under CPU bf16 autocast with bf16 inputs the value is float32 and matches float64 on the rounded inputs."""
    z, p = samples(12, 10, 4, dtype=torch.bfloat16, seed=8, shift=1.0)
    z.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v = mmd(z, p)
    assert v.dtype == torch.float32
    rv = naive_mmd(z.detach().double(), p.double())
    torch.testing.assert_close(v.detach().double(), rv, rtol=1e-5, atol=1e-7)
    v.backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()


@pytest.mark.parametrize(
    ("z", "p", "kernel", "match"),
    [
        (torch.zeros(1, 3), torch.zeros(4, 3), "imq", "at least 2"),
        (torch.zeros(4, 3), torch.zeros(1, 3), "imq", "at least 2"),
        (torch.zeros(4, 3), torch.zeros(4, 2), "imq", "one dimension"),
        (torch.zeros(4), torch.zeros(4), "imq", "one dimension"),
        (torch.zeros(4, 3), torch.zeros(4, 3), "laplace", "unknown MMD kernel"),
    ],
)
def test_bad_inputs_raise(z, p, kernel, match):
    """Too few rows, mismatched or missing dimensions and unknown kernels are ValueErrors."""
    with pytest.raises(ValueError, match=match):
        mmd(z, p, kernel)


@pytest.fixture()
def one_thread():
    """Many tiny kernels: intra-op threads only add synchronisation, which is slow on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_unbiased_under_the_null_and_positive_under_a_shift(kernel, one_thread):
    """Over 200 draws, the mean estimate is within 3 standard errors of 0 for Q = P and far above 0 for a shift."""
    g = torch.Generator().manual_seed(9)
    draws, n, d = 200, 64, 4
    null, shifted = [], []
    for _ in range(draws):
        z, p, q = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(3))
        null.append(mmd(z, p, kernel))
        shifted.append(mmd(q + 1.0, p, kernel))
    null, shifted = torch.stack(null), torch.stack(shifted)
    se_null = null.std() / math.sqrt(draws)
    se_shift = shifted.std() / math.sqrt(draws)
    assert (null < 0).any()  # individual values can be negative: the estimator is not clipped
    assert null.mean().abs() < 3 * se_null
    assert shifted.mean() > 20 * se_shift


def test_backward_keeps_no_pairwise_buffers_above_the_small_size(monkeypatch):
    """Above kernel_mmd.SMALL pairs, the tensors saved for backward are only the inputs: none has n*m (or n*n)
    elements; below it, only the kernel's slope (one float per pair) is kept besides them."""
    n, m, d = 40, 30, 3
    z, p = samples(n, m, d, dtype=torch.float32, seed=10)
    z.requires_grad_()
    p.requires_grad_()

    def saved_sizes(fn):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(z, p)
        return sizes

    small = saved_sizes(lambda a, b: mmd(a, b, "imq"))
    assert sum(small) == (n + m) * d + n * n + m * m + n * m
    monkeypatch.setattr(kernel_mmd, "SMALL", n * n + m * m + n * m - 1)
    sizes = saved_sizes(lambda a, b: mmd(a, b, "imq"))
    assert sizes and max(sizes) <= max(n, m) * d
    assert sum(sizes) == (n + m) * d
    # positive control: a plain autograd implementation does keep pairwise buffers
    naive = saved_sizes(lambda a, b: (torch.cdist(a, b) ** 2).add(1.0).reciprocal().mean())
    assert max(naive) >= n * m


def test_penalty_uses_the_prior_variance():
    """The registered builder's penalty equals the reference with sigma2 = the prior's per-coordinate variance."""
    prior = Prior("sphere", 3, 2.0)
    penalty = kernel_mmd.build(MMDConfig(kernel="rbf"), prior, "deterministic")
    z, p = samples(6, 6, 3, seed=11)

    torch.testing.assert_close(penalty(LatentCodes(z=z), p), naive_mmd(z, p, "rbf", 4.0 / 3.0), rtol=1e-12, atol=1e-14)
