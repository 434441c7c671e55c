"""Evaluation metrics against independent references: scipy's matrix square root, a float64 double loop, the
closed form of the cubic-kernel MMD between Gaussians, scipy's k-d tree and Laplace filter, constructed sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.spatial
import torch

from vegan_scale.evaluation import metrics


def _fid_reference(x: np.ndarray, y: np.ndarray) -> float:
    m1, m2 = x.mean(axis=0), y.mean(axis=0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(root))


def test_fid_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
    y = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12)) + 0.5
    assert metrics.fid(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(_fid_reference(x, y), rel=1e-9)
    assert metrics.fid(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_known_gaussians() -> None:
    """Commuting covariances: the distance is |m1 - m2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    m1, m2 = torch.zeros(3), torch.tensor([1.0, 2.0, 0.0])
    expected = 5.0 + ((a.sqrt() - b.sqrt()) ** 2).sum().item()
    assert metrics.frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_the_fid_of_features_that_are_not_finite_is_nan() -> None:
    """A model whose outputs are NaN (an export with a negative batch-norm variance) ended `vegan-scale eval` in
    torch's LinAlgError from eigh; its FID is NaN, as a collapsed model's is."""
    good = torch.randn(50, 4, dtype=torch.float64)
    assert math.isnan(metrics.fid(good, torch.full((50, 4), float("nan"), dtype=torch.float64)))
    assert math.isnan(metrics.fid(good.clone().fill_(float("inf")), good))


def _mmd2_double_loop(x: np.ndarray, y: np.ndarray) -> float:
    n, d = x.shape
    k = lambda a, b: (float(a @ b) / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    return xx + yy - 2 * xy


def test_kid_matches_a_double_loop() -> None:
    """One subset as large as the sets is the whole sets (in another order): the plain unbiased estimate."""
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) * 1.5 + 0.3
    value, _ = metrics.kid(torch.from_numpy(x), torch.from_numpy(y), subsets=1, subset_size=30)
    assert value == pytest.approx(_mmd2_double_loop(x, y), rel=1e-10)


def _cubic_mmd2_gaussians(d: int, a: float) -> float:
    """E of the unbiased cubic-kernel MMD^2 between N(0, I_d) and N(mu, I_d) with |mu|^2 = a.

    With s = x.y/d: E k(x, x') = 1 + 3/d (E s = E s^3 = 0, E s^2 = 1/d); for y = mu + g, y.y' = a + u with
    E u^2 = 2a + d and E u^3 = 6a, so E k(y, y') = c^3 + 3c(2a + d)/d^2 + 6a/d^3 with c = 1 + a/d;
    E k(x, y) = 1 + 3(a + d)/d^2 (x.y has mean 0 and variance a + d, odd moments 0).
    """
    c = 1 + a / d
    kxx = 1 + 3 / d
    kyy = c**3 + 3 * c * (2 * a + d) / d**2 + 6 * a / d**3
    kxy = 1 + 3 * (a + d) / d**2
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_kid_matches_the_closed_form_on_gaussians(shift: float) -> None:
    d, n = 16, 3000
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64) + shift
    value, std = metrics.kid(x, y, subsets=10, subset_size=1000, generator=g)
    expected = _cubic_mmd2_gaussians(d, d * shift**2)  # 0 and 1.0293
    assert 0 < std < 0.05
    assert value == pytest.approx(expected, abs=0.005, rel=0.06)  # several standard deviations of the estimate


def test_knn_radii_match_a_kd_tree() -> None:
    x = np.random.default_rng(3).normal(size=(500, 6))
    expected = scipy.spatial.cKDTree(x).query(x, k=4)[0][:, 3]  # the point itself first, then 3 neighbours
    radii = metrics.knn_radii(torch.from_numpy(x), k=3, chunk=128)
    np.testing.assert_allclose(radii.numpy(), expected, rtol=1e-10)


def _clusters(centres: torch.Tensor, per: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + 0.1 * torch.randn(per, centres.shape[1], generator=g, dtype=torch.float64) for c in centres])


def test_precision_recall_on_constructed_sets() -> None:
    """Ten tight modes far apart in the plane (in few dimensions the k-NN balls of a few hundred points cover
    their mode well)."""
    angles = torch.arange(10, dtype=torch.float64) * 2 * torch.pi / 10
    centres = 20.0 * torch.stack([angles.cos(), angles.sin()], dim=1)
    real = _clusters(centres, 200, seed=4)
    assert metrics.precision_recall(real, real.clone()) == (1.0, 1.0)
    far = _clusters(centres + 1000.0, 100, seed=5)
    assert metrics.precision_recall(real, far) == (0.0, 0.0)
    dropped = _clusters(centres[:3], 300, seed=6)  # every sample from 3 of the 10 modes
    precision, recall = metrics.precision_recall(real, dropped)
    assert precision > 0.95
    assert 0.27 <= recall <= 0.3  # the kept modes' share of the real points, less a few outliers
    same_modes = _clusters(centres, 200, seed=7)
    assert min(metrics.precision_recall(real, same_modes)) > 0.9


@pytest.mark.parametrize("channels", [1, 3])
def test_sharpness_is_the_variance_of_scipys_laplacian(channels: int) -> None:
    images = np.random.default_rng(8).random((5, channels, 12, 10))
    grey = images[:, 0] if channels == 1 else np.einsum("nchw,c->nhw", images, metrics.GREY)
    # the interior of scipy's filter output: the WAE code's 'VALID' convolution, whatever scipy's border mode
    expected = [scipy.ndimage.laplace(g)[1:-1, 1:-1].var() for g in grey]
    np.testing.assert_allclose(metrics.laplacian_variance(torch.from_numpy(images)).numpy(), expected, rtol=1e-10)
