"""Reconstruction costs against hand-written float64 formulas, and priors against their closed-form moments."""

from __future__ import annotations

import math

import pytest
import torch

from vegan_scale.costs import reconstruction_cost
from vegan_scale.models.outputs import Reconstruction
from vegan_scale.priors import Prior


def images(seed, shape=(3, 1, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    logits = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    return x, logits


def reference_cost(x, logits, kind, factor):
    """Per-sample cost written element by element in float64 from the cost's formula."""
    out = []
    for xi, li in zip(x, logits, strict=True):
        xs, ls = xi.flatten().tolist(), li.flatten().tolist()
        ys = [1.0 / (1.0 + math.exp(-v)) for v in ls]
        if kind == "l2sq":
            out.append(factor * sum((a - b) ** 2 for a, b in zip(xs, ys, strict=True)))
        elif kind == "l2":
            out.append(factor * math.sqrt(1e-8 + sum((a - b) ** 2 for a, b in zip(xs, ys, strict=True))))
        elif kind == "l1":
            out.append(factor * sum(abs(a - b) for a, b in zip(xs, ys, strict=True)))
        else:  # Bernoulli negative log-likelihood of x under sigmoid(logits)
            out.append(factor * -sum(a * math.log(b) + (1 - a) * math.log(1 - b) for a, b in zip(xs, ys, strict=True)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize(("kind", "factor"), [("l2sq", 0.05), ("l2", 0.2), ("l1", 0.02), ("bernoulli", 1.0)])
@pytest.mark.parametrize("scale", [None, 0.7])
def test_costs_match_hand_computed_float64(kind, factor, scale):
    """Each cost is per-sample and equals its float64 formula with the WAE factor, or the explicit scale."""
    x, logits = images(sum(map(ord, kind)))
    cost = reconstruction_cost(x, Reconstruction(logits=logits), kind, scale)
    assert cost.shape == (3,)
    ref = reference_cost(x, logits, kind, factor if scale is None else scale)
    torch.testing.assert_close(cost, ref, rtol=1e-10, atol=1e-12)


def test_l2_cost_at_a_perfect_reconstruction():
    """l2 of identical images is 0.2 * sqrt(1e-8) (the epsilon keeps the gradient finite); l2sq and l1 are 0."""
    logits = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    x = torch.sigmoid(logits)
    recon = Reconstruction(logits=logits.requires_grad_())
    torch.testing.assert_close(reconstruction_cost(x, recon, "l2"), torch.full((2,), 0.2e-4, dtype=torch.float64))
    reconstruction_cost(x, recon, "l2").sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert reconstruction_cost(x, recon, "l2sq").abs().max() < 1e-15
    assert reconstruction_cost(x, recon, "l1").abs().max() < 1e-15


def test_unknown_cost_raises():
    """An unknown cost name is a ValueError that lists the choices."""
    x, logits = images(0)
    with pytest.raises(ValueError, match="unknown cost"):
        reconstruction_cost(x, Reconstruction(logits=logits), "l3")


@pytest.mark.parametrize("logvar_value", [-3.0, -1.0])
def test_gaussian_decoder_l2sq_expectation(logvar_value):
    """E l2sq over the decoder's noise = 0.05 (sum (x - mean)^2 + D exp(logvar)), within 4 standard errors."""
    torch.manual_seed(1)
    x, logits = images(2, shape=(1, 1, 6, 6))
    logvar = torch.full_like(logits, logvar_value)
    recon = Reconstruction(logits=logits.expand(4000, -1, -1, -1), logvar=logvar.expand(4000, -1, -1, -1))
    costs = reconstruction_cost(x.expand(4000, -1, -1, -1), recon, "l2sq")
    expected = 0.05 * (((x - torch.sigmoid(logits)) ** 2).sum() + 36 * math.exp(logvar_value))
    se = costs.std() / math.sqrt(len(costs))
    assert abs(costs.mean() - expected) < 4 * se
    assert costs.std() > 0  # the cost is really taken on a noisy sample
    # the Bernoulli cost ignores the decoder's variance
    torch.testing.assert_close(
        reconstruction_cost(x, Reconstruction(logits=logits, logvar=logvar), "bernoulli"),
        reference_cost(x, logits, "bernoulli", 1.0),
    )


def test_gaussian_prior_moments():
    """Gaussian prior: mean 0, per-coordinate variance = scale, on 20k samples."""
    prior = Prior("gaussian", 4, 2.5)
    z = prior.sample(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert z.shape == (20000, 4)
    assert z.mean(0).abs().max() < 4 * math.sqrt(2.5 / 20000)
    torch.testing.assert_close(z.var(0), torch.full((4,), 2.5, dtype=torch.float64), rtol=0.05, atol=0)
    assert prior.variance == 2.5


@pytest.mark.parametrize("dim", [2, 5])
def test_sphere_prior(dim):
    """Sphere prior: every norm equals the radius, per-coordinate variance radius^2 / dim, mean 0."""
    prior = Prior("sphere", dim, 3.0)
    z = prior.sample(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(z.norm(dim=1), torch.full((20000,), 3.0, dtype=torch.float64))
    assert prior.variance == pytest.approx(9.0 / dim)
    torch.testing.assert_close(z.var(0), torch.full((dim,), 9.0 / dim, dtype=torch.float64), rtol=0.05, atol=0)
    assert z.mean(0).abs().max() < 0.1


def test_box_prior():
    """Box prior: all values in [-r, r], per-coordinate variance r^2 / 3 (uniform), mean 0."""
    prior = Prior("box", 3, 2.0)
    z = prior.sample(20000, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert z.abs().max() <= 2.0
    assert prior.variance == pytest.approx(4.0 / 3.0)
    torch.testing.assert_close(z.var(0), torch.full((3,), 4.0 / 3.0, dtype=torch.float64), rtol=0.05, atol=0)
    assert z.mean(0).abs().max() < 0.05


def test_to_support():
    """to_support is the identity (gaussian), projects onto the sphere of radius r, and maps into the box."""
    h = torch.randn(50, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 10
    torch.testing.assert_close(Prior("gaussian", 3).to_support(h), h)
    on_sphere = Prior("sphere", 3, 2.0).to_support(h)
    torch.testing.assert_close(on_sphere.norm(dim=1), torch.full((50,), 2.0, dtype=torch.float64))
    cos = torch.nn.functional.cosine_similarity(on_sphere, h, dim=1)  # same direction as the input
    torch.testing.assert_close(cos, torch.ones(50, dtype=torch.float64))
    in_box = Prior("box", 3, 0.5).to_support(h)
    assert in_box.abs().max() <= 0.5
    torch.testing.assert_close(in_box, 0.5 * torch.tanh(h))


@pytest.mark.parametrize(
    ("kind", "dim", "scale"), [("laplace", 2, 1.0), ("gaussian", 2, 0.0), ("box", 2, -1.0), ("sphere", 0, 1.0)]
)
def test_bad_prior_raises(kind, dim, scale):
    """An unknown kind, a non-positive scale or a non-positive dimension is a ValueError."""
    with pytest.raises(ValueError):
        Prior(kind, dim, scale)
