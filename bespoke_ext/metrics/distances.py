"""Distances between distributions: samples against real data, no pairing.

    Frechet distance of two sets of feature vectors, each summarised by mean mu and covariance C:
        FD = ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a^{1/2} C_b C_a^{1/2})^{1/2})
    computed in the feature space of the package's small digit classifier (classifier.py): the
    "Frechet classifier distance" (FCD). It is FID's formula with a different network, so its values
    are not comparable with published FIDs.

    Sliced Wasserstein distance for low-dimensional samples (the 2-D model):
        SW_p(a, b) = (mean over unit directions theta of W_p(<a, theta>, <b, theta>)^p)^{1/p}
    where each 1-D W_p is exact for empirical measures (quantile functions, below).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["frechet_distance", "frechet_distance_from_moments", "feature_moments", "sliced_wasserstein",
           "projection_directions"]


def feature_moments(features: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    if not torch.is_tensor(features) or features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be a tensor [N, D] with N >= 2, got "
                         f"{tuple(features.shape) if torch.is_tensor(features) else type(features).__name__}")
    f = features.double()
    mu = f.mean(dim=0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(c: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues clipped at 0,
    so rounding that leaves a tiny negative eigenvalue cannot produce NaN)."""
    w, v = torch.linalg.eigh((c + c.T) / 2)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance_from_moments(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(C_a) + Tr(C_b) - 2 Tr((C_a^{1/2} C_b C_a^{1/2})^{1/2}).

    Tr((C_a^{1/2} C_b C_a^{1/2})^{1/2}) equals Tr((C_a C_b)^{1/2}) but is the square root of a
    symmetric PSD matrix, so one eigendecomposition gives it stably (no complex parts to discard).
    """
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"moments must be means [D] and covariances [D, D] of one D; got {tuple(mu_a.shape)}, "
                         f"{tuple(cov_a.shape)}, {tuple(mu_b.shape)}, {tuple(cov_b.shape)}")
    root_a = _psd_sqrt(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(value.clamp_min(0))  # >= 0 exactly; rounding can leave -1e-13


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    if features_a.dim() != 2 or features_b.dim() != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"features_a and features_b must be [N, D] with the same D, got "
                         f"{tuple(features_a.shape)} and {tuple(features_b.shape)}")
    return frechet_distance_from_moments(*feature_moments(features_a), *feature_moments(features_b))


def projection_directions(dim: int, count: int, seed: int = 0) -> Tensor:
    """``count`` unit vectors [count, dim] (float64): evenly spaced angles on [0, pi) for dim 2
    (a line and its opposite give the same 1-D distance up to reflection, so half a turn covers
    every direction, and even spacing beats random draws at a given count); seeded normalised
    Gaussian draws otherwise."""
    if dim < 1 or count < 1:
        raise ValueError(f"dim and count must be >= 1, got dim={dim}, count={count}")
    if dim == 2:
        angles = (torch.arange(count, dtype=torch.float64) + 0.5) * (math.pi / count)
        return torch.stack([angles.cos(), angles.sin()], dim=1)
    g = torch.Generator().manual_seed(int(seed))
    v = torch.randn(count, dim, generator=g, dtype=torch.float64)
    return v / v.norm(dim=1, keepdim=True)


def _wasserstein_1d(a: Tensor, b: Tensor, p: float) -> Tensor:
    """W_p^p between the empirical measures of the columns of a [N_a, K] and b [N_b, K], [K].

    W_p^p = integral over q in (0, 1) of |F_a^{-1}(q) - F_b^{-1}(q)|^p dq. Both quantile functions
    are step functions with breaks at k / N_a and k / N_b; on each interval between consecutive
    breaks both are constant, so evaluating at the interval's midpoint gives the integral exactly.
    """
    a, b = a.sort(dim=0).values, b.sort(dim=0).values
    na, nb = a.shape[0], b.shape[0]
    breaks = torch.cat([torch.arange(1, na + 1, dtype=torch.float64) / na,
                        torch.arange(1, nb + 1, dtype=torch.float64) / nb]).unique()  # sorted, ends at 1
    widths = torch.diff(breaks, prepend=breaks.new_zeros(1))
    mids = breaks - widths / 2
    ia = (mids * na).floor().long().clamp_max(na - 1)
    ib = (mids * nb).floor().long().clamp_max(nb - 1)
    return ((a[ia] - b[ib]).abs().pow(p) * widths[:, None]).sum(dim=0)


def sliced_wasserstein(a: Tensor, b: Tensor, *, projections: int = 256, p: float = 1.0, seed: int = 0) -> float:
    """Sliced p-Wasserstein distance between point sets a [N_a, D] and b [N_b, D] (sizes may differ).

    SW_p = (mean over ``projections`` directions theta of W_p^p(<a, theta>, <b, theta>))^{1/p}.
    For b = a + shift and p = 1 it is the mean of |<shift, theta>| (2|shift|/pi in 2-D as the
    directions become dense).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be point sets [N, D] with the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 1 or b.shape[0] < 1:
        raise ValueError(f"a and b must hold at least one point each, got {a.shape[0]} and {b.shape[0]}")
    if not (isinstance(p, (int, float)) and p >= 1):
        raise ValueError(f"p must be a number >= 1, got {p!r}")
    theta = projection_directions(a.shape[1], projections, seed)
    wp = _wasserstein_1d(a.double() @ theta.T, b.double() @ theta.T, p)
    return float(wp.mean() ** (1.0 / p))
