"""Sample-quality metrics on feature vectors and images; pure torch, float64.

* Fréchet distance (FID, Heusel et al. 2017) between Gaussians fitted to two feature sets. The matrix square root
  term uses symmetric eigendecompositions only: with S = C1^(1/2), C1 C2 = S (S C2 S) S^(-1) has the eigenvalues of
  the symmetric positive semi-definite S C2 S, so tr((C1 C2)^(1/2)) is the sum of their square roots. No general
  (non-symmetric) square root, whose round-off gives the familiar small imaginary parts, is needed.
* KID (Bińkowski et al. 2018): the unbiased MMD^2 with the cubic kernel k(x, y) = (x.y / d + 1)^3, averaged over
  random subsets; unbiased at any sample size, unlike FID, whose bias depends on N (so FID is compared at one N).
* Improved precision and recall (Kynkäänniemi et al. 2019): each set's manifold is the union of balls around its
  points reaching their k-th nearest neighbour; precision is the share of generated points inside the real
  manifold, recall the share of real points inside the generated one.
* Sharpness: the variance of the Laplacian of each image, as the WAE paper (and its code: 3x3 Laplace filter,
  'VALID' convolution, RGB turned grey) measures blur; blurry samples have a small one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LAPLACE = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
GREY = (0.2989, 0.5870, 0.1140)  # tf.image.rgb_to_grayscale, as the WAE code


def gaussian_fit(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) covariance of the rows of ``features`` [N, d], in float64."""
    x = features.double()
    return x.mean(dim=0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: Tensor) -> Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """|m1 - m2|^2 + tr(C1) + tr(C2) - 2 tr((C1 C2)^(1/2)) between N(m1, C1) and N(m2, C2)."""
    mean1, cov1, mean2, cov2 = (t.double() for t in (mean1, cov1, mean2, cov2))
    if not all(torch.isfinite(t).all() for t in (mean1, cov1, mean2, cov2)):
        return math.nan  # features of a model whose outputs are not finite: eigh would not converge
    s = _psd_sqrt(cov1)
    middle = s @ cov2 @ s
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return ((mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


def fid(features1: Tensor, features2: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N1, d] and [N2, d]."""
    return frechet_distance(*gaussian_fit(features1), *gaussian_fit(features2))


def _cubic_mmd2(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 of equally many rows of x and y under k(a, b) = (a.b / d + 1)^3."""
    n, d = x.shape
    kxx, kyy, kxy = ((a @ b.T / d + 1).pow(3) for a, b in ((x, x), (y, y), (x, y)))
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within - 2 * kxy.mean()


def kid(
    features1: Tensor,
    features2: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """(mean, standard deviation) over ``subsets`` random subsets (drawn without replacement, ``subset_size`` rows
    of each set, fewer when a set is smaller) of the unbiased cubic-kernel MMD^2."""
    x, y = features1.double(), features2.double()
    m = min(len(x), len(y), subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    values = torch.stack(
        [
            _cubic_mmd2(
                x[torch.randperm(len(x), generator=generator, device="cpu")[:m].to(x.device)],
                y[torch.randperm(len(y), generator=generator, device="cpu")[:m].to(y.device)],
            )
            for _ in range(subsets)
        ]
    )
    std = values.std().item() if subsets > 1 else 0.0
    return values.mean().item(), std


def _pairwise_distances(a: Tensor, b: Tensor, chunk: int) -> list[Tensor]:
    return [torch.cdist(part, b) for part in a.split(chunk)]


def knn_radii(features: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Distance of every row to its k-th nearest other row."""
    x = features.double()
    if len(x) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} samples, got {len(x)}")
    # the smallest distance of each row is its distance to itself (0): the k-th neighbour is the (k+1)-th smallest
    return torch.cat([d.topk(k + 1, dim=1, largest=False).values[:, k] for d in _pairwise_distances(x, x, chunk)])


def manifold_coverage(points: Tensor, centres: Tensor, radii: Tensor, chunk: int = 1024) -> float:
    """Share of ``points`` inside at least one ball (centre, radius)."""
    inside = [(d <= radii).any(dim=1) for d in _pairwise_distances(points.double(), centres.double(), chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real: Tensor, generated: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (generated inside the real manifold) and recall (real inside the generated one)."""
    precision = manifold_coverage(generated, real, knn_radii(real, k))
    recall = manifold_coverage(real, generated, knn_radii(generated, k))
    return precision, recall


def laplacian_variance(images: Tensor) -> Tensor:
    """Per image [N]: variance of the Laplacian of images [N, C, H, W] (grey, or RGB turned grey)."""
    x = images.double()
    if x.shape[1] == 3:
        x = (x * x.new_tensor(GREY).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(f"sharpness needs grey or RGB images, got {x.shape[1]} channels")
    laplacian = F.conv2d(x, x.new_tensor(LAPLACE).view(1, 1, 3, 3))
    return laplacian.flatten(1).var(dim=1, unbiased=False)
