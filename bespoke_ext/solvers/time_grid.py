"""Time grids of the fixed-step methods, with flow_matching's (torchdiffeq's) meaning of the arguments.

- ``time_grid`` alone: one step between consecutive points (increasing or decreasing).
- ``time_grid`` and ``step_size``: steps of ``step_size`` from time_grid[0], the last one cut to end
  exactly at time_grid[-1]; built in time_grid's dtype exactly as torchdiffeq builds it, so the
  same grid (and the same samples) come out.
- ``nfe`` (this package): ``steps`` uniform steps over [time_grid[0], time_grid[-1]] in float64.
Intermediates are reported at the time_grid points; a point inside a step is the linear
interpolation of the step's two ends, as torchdiffeq's fixed-grid solvers report it.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..integers import as_int
from torch import Tensor

__all__ = [
    "DEFAULT_TIME_GRID", "as_time_grid", "check_step_size", "record_plan", "step_size_grid",
    "steps_for_nfe", "uniform_grid",
]

DEFAULT_TIME_GRID = (0.0, 1.0)

# Per step: (time, w) for each intermediate in it, meaning (1 - w) x_start + w x_end.
RecordPlan = List[List[Tuple[float, float]]]


def refuse_grid_gradients(time_grid, enable_grad: bool) -> None:
    """With enable_grad, a time_grid that requires grad is refused: the grid only places the steps (it is
    read as numbers), so gradients with respect to it would silently be missing."""
    if enable_grad and torch.is_tensor(time_grid) and time_grid.requires_grad:
        raise ValueError("time_grid requires grad, but gradients with respect to the times are not computed (the "
                         "grid places the steps); pass time_grid.detach(), or learn the times with a solver "
                         "(bespoke_ext.train)")


def as_time_grid(time_grid, name: str = "time_grid") -> Tensor:
    """``time_grid`` as a 1-D float CPU tensor of at least 2 finite, strictly monotone points."""
    if time_grid is None:
        return torch.tensor(DEFAULT_TIME_GRID)  # float32, as flow_matching's default
    try:
        tg = torch.as_tensor(time_grid)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name} must be a 1-D tensor or sequence of times, got {type(time_grid).__name__}") from exc
    if tg.is_complex() or tg.dtype == torch.bool:
        raise ValueError(f"{name} must hold real times, got dtype {tg.dtype}")
    if not tg.is_floating_point():
        tg = tg.to(torch.get_default_dtype())
    tg = tg.detach().cpu()
    if tg.dim() != 1 or tg.numel() < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 points (start and end), got shape {tuple(tg.shape)}")
    if not bool(torch.isfinite(tg).all()):
        raise ValueError(f"{name} must be finite, got {tg.tolist()}")
    diff = tg[1:] - tg[:-1]
    if not (bool((diff > 0).all()) or bool((diff < 0).all())):
        raise ValueError(f"{name} must be strictly increasing or strictly decreasing, got {_short(tg)}")
    return tg


def step_size_grid(time_grid: Tensor, step_size: float) -> Tensor:
    """torchdiffeq's grid for a step size: start + k * step_size in time_grid's dtype, last point
    replaced by the end (a decreasing grid is built on the negated times, as torchdiffeq does).

    Returned in float64 (exact: the points are those of time_grid's dtype).
    """
    t = time_grid
    sign = -1.0 if t[0] > t[1] else 1.0
    t = t * sign
    start, end = t[0], t[-1]
    niters = int(torch.ceil((end - start) / step_size + 1).item())
    if niters - 1 > MAX_FIXED_STEPS:
        raise ValueError(f"step_size={step_size!r} makes {niters - 1} steps over [{float(t[0] * sign)}, "
                         f"{float(t[-1] * sign)}]; at most {MAX_FIXED_STEPS} (a larger step_size, or nfe)")
    grid = torch.arange(0, niters, dtype=t.dtype) * step_size + start
    grid[-1] = end
    # torchdiffeq can place the second-to-last point on or past the end when (end - start) /
    # step_size rounds up past an integer; such a point would make a step of length <= 0.
    keep = torch.cat([grid[:-1] < end, torch.tensor([True])])
    return (grid[keep] * sign).to(torch.float64)


def uniform_grid(start: float, end: float, steps: int) -> Tensor:
    """t_k = start + (end - start) k / steps in float64, ends exact."""
    k = torch.arange(steps + 1, dtype=torch.float64)
    grid = start + (end - start) * (k / steps)
    grid[0], grid[-1] = start, end
    return grid


def record_plan(grid: Tensor, time_grid: Tensor) -> RecordPlan:
    """Where each time_grid point after the first is reported, step by step (torchdiffeq's rule:
    after the step t0 -> t1, every not yet reported point up to t1 is interpolated in [t0, t1])."""
    sign = -1.0 if float(time_grid[0]) > float(time_grid[-1]) else 1.0
    ts = [sign * float(v) for v in time_grid.to(torch.float64)]
    gs = [sign * float(v) for v in grid]
    plan: RecordPlan = []
    j = 1
    for t0, t1 in zip(gs[:-1], gs[1:]):
        here: List[Tuple[float, float]] = []
        while j < len(ts) and t1 >= ts[j]:
            t = ts[j]
            w = 0.0 if t == t0 else 1.0 if t == t1 else (t - t0) / (t1 - t0)
            here.append((sign * t, w))
            j += 1
        plan.append(here)
    return plan


def _short(t: Tensor, limit: int = 12) -> str:
    values = t.tolist()
    return str(values) if len(values) <= limit else f"{values[:limit]} ... ({len(values)} points)"


def steps_for_nfe(nfe, evals_per_step: int, method: str) -> int:
    """The step count that makes exactly ``nfe`` model evaluations, or a ValueError saying which
    NFEs the method can make."""
    value = as_int(nfe)
    if value is None or value < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if value > MAX_FIXED_STEPS * evals_per_step:
        raise ValueError(f"nfe={value} makes more than {MAX_FIXED_STEPS} steps of method {method!r}")
    nfe = value
    if nfe % evals_per_step:
        below = nfe - nfe % evals_per_step
        nearest = " or ".join(str(c) for c in (below, below + evals_per_step) if c > 0)
        raise ValueError(
            f"method {method!r} makes {evals_per_step} model evaluations per step, so nfe must be a "
            f"multiple of {evals_per_step} (nearest: {nearest}); got nfe={nfe}"
        )
    return nfe // evals_per_step


# The most steps a fixed-step program takes: each is a few Python instructions and tensors, so a
# step_size of 1e-9 would fill memory while the program is built, before the first model call.
MAX_FIXED_STEPS = 1_000_000


def check_step_size(step_size) -> Optional[float]:
    if step_size is None:
        return None
    # a number (a 0-dim tensor too), not a string or a bool (True would be one step of 1.0)
    if isinstance(step_size, (bool, str, bytes)) or (torch.is_tensor(step_size) and step_size.numel() != 1):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    try:
        value = float(step_size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"step_size must be a positive number, got {step_size!r}") from exc
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
    return value
