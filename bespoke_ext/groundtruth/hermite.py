"""Cubic Hermite interpolation of a stored trajectory (method.md §6).

Between grid points g_k < t < g_{k+1}, with D = g_{k+1} - g_k and s = (t - g_k) / D in [0, 1],

    x(t) ~ h00(s) x_k + h10(s) D u_k + h01(s) x_{k+1} + h11(s) D u_{k+1}
    h00 = 2s^3 - 3s^2 + 1,   h10 = s^3 - 2s^2 + s,   h01 = -2s^3 + 3s^2,   h11 = s^3 - s^2

where u_k = dx/dt(g_k). The interpolant matches x and dx/dt at both ends, so it is 4th-order
accurate (error <= D^4 max|x''''| / 384) and differentiable in t: d/dt of the coefficients gives
the time gradient the loss needs (no x_aux trick in cached mode). The combination is one fused
``rk_update`` over 4 terms with one coefficient row per (time, sample).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..ops import rk_update as combine

__all__ = ["hermite_coefficients", "hermite_interpolate"]


def hermite_coefficients(grid: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """Segment index k [T] (long) and coefficient rows [T, 4] over (x_k, u_k, x_{k+1}, u_{k+1}).

    ``grid`` [G+1] increasing float64 with grid[0] <= t <= grid[-1]; ``t`` [T] may carry gradients,
    which flow through the returned coefficients (the segment choice itself is piecewise constant).
    """
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 points, got shape {tuple(grid.shape)}")
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D [T], got shape {tuple(t.shape)}")
    t = t.to(grid.dtype)
    td = t.detach().contiguous()
    # Tolerate rounding at the ends (t_n = 1 computed as S / S may differ from 1 by an ulp).
    eps = 1e-9 * float(grid[-1] - grid[0])
    if bool((td < grid[0] - eps).any()) or bool((td > grid[-1] + eps).any()):
        raise ValueError(f"times must lie in the cached grid's range [{float(grid[0])}, {float(grid[-1])}], "
                         f"got min {float(td.min())}, max {float(td.max())}")
    k = (torch.searchsorted(grid, td, right=True) - 1).clamp(0, grid.numel() - 2)
    g0, g1 = grid[k], grid[k + 1]
    d = g1 - g0
    s = (t - g0) / d
    s2, s3 = s * s, s * s * s
    h00 = 2 * s3 - 3 * s2 + 1
    h10 = s3 - 2 * s2 + s
    h01 = -2 * s3 + 3 * s2
    h11 = s3 - s2
    return k, torch.stack([h00, d * h10, h01, d * h11], dim=-1)


def hermite_interpolate(x_k: Tensor, u_k: Tensor, x_k1: Tensor, u_k1: Tensor, coeffs: Tensor) -> Tensor:
    """h00 x_k + h10 D u_k + h01 x_{k+1} + h11 D u_{k+1}: one fused update, coeffs [N, 4] or [4]."""
    return combine([x_k, u_k, x_k1, u_k1], coeffs)
