"""Adaptive Dormand-Prince 5(4) ("dopri5"), the ground-truth solver, through torchdiffeq.

torchdiffeq is maintained by one of the method's authors and is flow_matching's own backend, so
adaptive solves agree with flow_matching's; what this module adds is the count of model
evaluations the adaptive controller spent and the same output checks as the fixed-step executor.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor
from torchdiffeq import odeint

from .executor import check_velocity
from .stats import ForwardCounter, SampleStats

__all__ = ["ADAPTIVE_METHODS", "solve_adaptive"]

ADAPTIVE_METHODS = ("dopri5",)


def solve_adaptive(model: Callable, x0: Tensor, time_grid: Tensor, *, atol: float, rtol: float,
                   extras: dict, enable_grad: bool = False, method: str = "dopri5"
                   ) -> Tuple[Tensor, SampleStats]:
    """Solve dx/dt = model(x, t, **extras) through ``time_grid``; returns ([T, *x0.shape], stats).

    Tolerances are per element, mixed: |error| <= atol + rtol |x| (torchdiffeq's RMS norm).
    """
    counter = ForwardCounter(model)
    calls = 0

    def field(t: Tensor, x: Tensor) -> Tensor:
        nonlocal calls
        v = model(x, t, **extras)
        if calls == 0:
            check_velocity(v, x, t, method)
            counter.after_first_eval()
        calls += 1
        return v

    with torch.set_grad_enabled(enable_grad):
        traj = odeint(field, x0, time_grid.to(x0.device), method=method, atol=atol, rtol=rtol)
    stats = SampleStats(nfe=calls, network_forwards=calls * counter.per_eval, steps=None, method=method)
    return traj, stats
