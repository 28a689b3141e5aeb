"""The least-squares start of a non-stationary solver: its coefficients fitted to ground truth before training.

On a fixed time grid t_0 < ... < t_n the family (method.md §9) is linear in its coefficients:

    x_{i+1} = a_i x_0 + sum_{j<=i} b_ij U_j,    U_j = u(x_j, t_j).

Row by row, i = 0..n-1, the row r_i = (a_i, b_i0, ..., b_ii) minimises over M ground-truth trajectories x^m(t)

    sum_m || a_i x_0^m + sum_j b_ij U_j^m - x^m(t_{i+1}) ||^2  +  lam || D (r_i - r_i^start) ||^2,

where the U_j^m are evaluated at the states that the rows fitted so far produce (not at the ground truth's),
so each row also corrects the drift of the rows before it. The last target is x(1): given the velocities,
the final sample's mean squared error is minimised exactly. D = sqrt(diag G) scales each column to unit
norm (G the row's Gram matrix) and lam = 1e-8: a direction the data cannot tell apart (x_0 and U_0 of an
OT field are nearly collinear) keeps the start's value instead of a large cancelling pair.
Cost: n model evaluations of the M samples, without gradients (no backward pass).

Why: from Euler, gradient steps on the log-MSE loss move each raw number about lr per step; the MNIST
solver at NFE 10 needed more than 600 of them (RMSE 0.0221) and still missed midpoint NFE 20 (0.0192).
The fitted start alone reaches 0.0211 in 2 s; training then refines times and coefficients on the
paper's loss (demo/presets.py has the measurements).

Distributed: each rank fits its slice of the M trajectories; the Gram matrices and right-hand sides are
summed across ranks, so every rank solves the same system (one process's result up to summation order).
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from ..groundtruth.inputs import rows_of
from .distributed import DistContext

__all__ = ["least_squares_start", "fit_coefficients", "warped", "RIDGE", "WARPS"]

RIDGE = 1e-8
# Time-grid warps a search may try (TrainOptions.fit_warps; training uses only p = 1 unless asked), t -> t^p,
# the grid as given first. The fitted error depends strongly on the grid for
# guided fields (mnist_cond, g = 2, NFE 10, RMSE of the fitted start: p = 1 0.0363, 1.25 0.0310, 1.5 0.0292,
# 2 0.0331) and little for MNIST (1 0.0211, 1.25 0.0210, 1.5 0.0246, 0.8 0.0356); gradient steps move
# times slowly. It is judged on all the fit's samples: per-sample errors of a guided field are heavy-tailed,
# and a 16-sample subset ranked p = 1 first where all 64 ranked it last. Even so the fit set's error chose
# p = 1.41 on MNIST, where held-out samples prefer 1 (hence not the default).
WARPS = (1.0, 2 ** -0.5, 2 ** -0.25, 2 ** 0.25, 2 ** 0.5, 2 ** 0.75, 2.0, 2 ** 1.25, 2 ** 1.5)
Target = Callable[[float], Tensor]


def _evaluate(model: Callable, x: Tensor, t: Tensor, extras: dict, conditions: Optional[dict], chunk: int) -> Tensor:
    """u(x, t) in chunks of ``chunk`` samples, t a 0-dim time as sampling passes it."""
    parts = []
    for lo in range(0, x.shape[0], chunk):
        part = slice(lo, min(lo + chunk, x.shape[0]))
        parts.append(model(x[part], t, **extras, **rows_of(conditions, part)))
    return torch.cat(parts) if parts else x.clone()


def _dot(u: Tensor, v: Tensor) -> Tensor:
    return (u.double() * v.double()).sum()


def _solve_row(gram: Tensor, rhs: Tensor, start: Tensor) -> Tensor:
    """argmin ||D c - y||^2 + lam ||D (c - start)||^2 from its normal equations, columns scaled to unit norm."""
    scale = gram.diagonal().clamp_min(0).sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))          # a zero column: the ridge keeps start
    g = gram / (scale[:, None] * scale[None, :])
    z0 = start * scale
    z = torch.linalg.solve(g + RIDGE * torch.eye(len(z0), dtype=g.dtype), rhs / scale + RIDGE * z0)
    return z / scale


def fit_coefficients(solver, model: Callable, x0: Tensor, target: Target, *, ctx: DistContext,
                     extras: Optional[dict] = None, conditions: Optional[dict] = None, chunk_size: int = 16384) -> float:
    """Fit ``solver``'s coefficients row by row at its current times (module docstring); in place.

    ``x0`` [M, *shape]: this rank's noise samples; ``target(t)``: their ground truth at time t [M, *shape];
    ``conditions``: their per-sample model inputs. Returns the final sample's mean squared error over all
    ranks' samples, or NaN (the solver unchanged) when the model's velocities or the ground truth are not
    finite.
    """
    n, extras = solver.nfe, dict(extras or {})
    with torch.no_grad():
        grid = solver.times()
        t = grid.to(device=x0.device, dtype=x0.dtype)
        a, b = (v.detach().to("cpu", torch.float64).clone() for v in solver.coefficients())
        columns: List[Tensor] = [x0]               # x_0, U_0, ..., U_i of this rank's samples
        gram = torch.zeros(n + 1, n + 1, dtype=torch.float64)
        gram[0, 0] = _dot(x0, x0)
        x = x0
        for i in range(n):
            u = _evaluate(model, x, t[i], extras, conditions, chunk_size)
            columns.append(u)
            k = i + 2
            for j in range(k):                     # the new column's inner products (the rest is kept)
                gram[k - 1, j] = gram[j, k - 1] = _dot(u, columns[j])
            y = target(float(grid[i + 1]))
            rhs = torch.stack([_dot(c, y) for c in columns])
            system = ctx.all_reduce_sum_(torch.cat([gram[:k, :k].reshape(-1), rhs]).to(x0.device)).cpu()
            if not bool(torch.isfinite(system).all()):
                return math.nan
            row = _solve_row(system[:k * k].reshape(k, k), system[k * k:], torch.cat([a[i:i + 1], b[i, :i + 1]]))
            a[i], b[i, :i + 1] = row[0], row[1:]
            x = sum(float(c) * col for c, col in zip(row, columns))
        error = ctx.all_reduce_sum_(torch.stack([_dot(x - y, x - y), torch.tensor(float(y.numel()), dtype=torch.float64,
                                                                                  device=y.device)]).to(x0.device))
        solver.set_coefficients(a, b)
    return float(error[0] / error[1])


def warped(times: Tensor, p: float) -> Tensor:
    """t -> t^p on a time grid (0 and 1 stay, the order is kept): p > 1 puts more steps near t = 0."""
    return times.detach().double().cpu() ** p


def least_squares_start(solver, model: Callable, x0: Tensor, target: Target, *, ctx: DistContext,
                        extras: Optional[dict] = None, conditions: Optional[dict] = None, chunk_size: int = 16384,
                        warps: Sequence[float] = WARPS) -> dict:
    """Fit at the time grid among ``solver.times() ** p`` (p in ``warps``; warps[0] = 1, the grid as given) with
    the lowest final mean squared error over the fit's samples, found by walking from p = 1 towards the better
    neighbour until it stops improving (2-4 fits in practice; each is n evaluations of every sample).

    The solver is left as given (with a warning) when the fit is not finite. Returns {"warp": p, "mse": the
    chosen fit's MSE (NaN if none), "searched": {p: MSE}}.
    """
    kw = dict(ctx=ctx, extras=extras, conditions=conditions, chunk_size=chunk_size)
    given = [t.detach().clone() for t in solver.state_dict().values()]
    given_times = solver.times()
    searched, fitted = {}, {}

    def score(i: int) -> float:
        p = warps[i]
        if p not in searched:
            solver.set_times(warped(given_times, p))
            searched[p] = fit_coefficients(solver, model, x0, target, **kw)
            fitted[p] = [t.detach().clone() for t in solver.state_dict().values()]
        return searched[p]

    order = sorted(range(len(warps)), key=lambda i: warps[i])
    best = pos = order.index(0)
    if math.isfinite(score(order[pos])):
        for step in (1, -1):   # the fitted error is unimodal in p in practice
            while 0 <= best + step < len(order) and score(order[best + step]) < score(order[best]):
                best += step
            if best != pos:
                break
    p = warps[order[best]]
    keep = fitted[p] if math.isfinite(searched[p]) else given
    with torch.no_grad():
        for t, v in zip(solver.state_dict().values(), keep):
            t.copy_(v)
    if not math.isfinite(searched[p]):
        warnings.warn("bespoke_ext.train: the least-squares start was skipped: the model's velocities or the "
                      "ground truth are not finite on the fit's samples; training starts from the solver as "
                      "given", RuntimeWarning, stacklevel=3)
    return {"warp": p, "mse": searched[p], "searched": dict(searched)}
