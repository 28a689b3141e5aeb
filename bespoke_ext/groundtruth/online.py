"""Online ground truth (the paper's): solve the ODE at the solver's current times, every iteration.

The loss needs x(t_i) as a function of the learnable times t_i, with the right derivative. The solve
itself is data (times detached); with tt = stop_gradient(t) the value is re-attached as (method.md §5)

    x_aux(t) = x(tt) + u(x(tt), tt) (t - tt)

which equals x(tt) and has d x_aux / dt = u = dx/dt, the true derivative of the exact trajectory. The
combination is one fused ``rk_update`` with a coefficient row (1, t - tt) per (time, sample).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..ops import rk_update as combine
from .inputs import for_positions
from .odesolve import DEFAULT_TOL, solve_trajectories

__all__ = ["online_states", "velocities_at"]


@torch.no_grad()
def velocities_at(model: Callable, states: Tensor, times: Tensor, *, model_extras: Optional[dict] = None,
                  chunk_size: int = 65536, conditions: Optional[dict] = None) -> Tensor:
    """u(x, t) for states [T, B, *shape] at times [T] (batched over T*B samples, chunked); ``conditions``
    {name: Tensor [B, ...]} are tiled with the states."""
    t_count, b = states.shape[:2]
    flat = states.reshape(t_count * b, *states.shape[2:])
    tt = times.detach().to(device=states.device, dtype=states.dtype).repeat_interleave(b)
    out = torch.empty_like(flat)
    for a in range(0, flat.shape[0], chunk_size):
        part = slice(a, min(a + chunk_size, flat.shape[0]))
        out[part] = model(flat[part], tt[part], **(model_extras or {}), **for_positions(conditions, part, b))
    return out.reshape(states.shape)


def online_states(model: Callable, x0: Tensor, times: Tensor, *, rtol: float = DEFAULT_TOL, atol: float = DEFAULT_TOL,
                  model_extras: Optional[dict] = None, group_size: int = 512, chunk_size: int = 65536,
                  stats: Optional[dict] = None, conditions: Optional[dict] = None) -> Tensor:
    """x(times) from x(0) = x0: [T, B, *shape], differentiable in ``times`` through x_aux.

    ``conditions``: per-sample model inputs {name: Tensor [B, ...]} (one row per sample of x0).

    ``times`` [T] increasing in [0, 1]; when times[0] > 0 the solve starts at 0 anyway (x0 is noise).
    """
    if times.dim() != 1 or times.numel() < 1:
        raise ValueError(f"times must be a non-empty 1-D tensor, got shape {tuple(times.shape)}")
    tt = times.detach().to(torch.float64)
    starts_at_zero = float(tt[0]) == 0.0
    solve_at = tt if starts_at_zero else torch.cat([tt.new_zeros(1), tt])
    if solve_at.numel() == 1:
        states = x0.unsqueeze(0)
    else:
        states = solve_trajectories(model, x0, solve_at, rtol=rtol, atol=atol, model_extras=model_extras,
                                    group_size=group_size, stats=stats, conditions=conditions)
    if not starts_at_zero:
        states = states[1:]
    vel = velocities_at(model, states, tt, model_extras=model_extras, chunk_size=chunk_size, conditions=conditions)
    if stats is not None:
        stats["nfe"] = stats.get("nfe", 0) + 1
    t_count, b = states.shape[:2]
    # Row (1, t - tt) per (time, sample): value x(tt), derivative u with respect to t.
    delta = times.to(torch.float64) - tt
    rows = torch.stack([torch.ones_like(delta), delta], dim=-1).repeat_interleave(b, dim=0)
    flat = lambda v: v.reshape(t_count * b, *v.shape[2:])
    return combine([flat(states), flat(vel)], rows).reshape(states.shape)
