"""The methods that run through torchdiffeq: adaptive Runge-Kutta, multistep (Adams) and scipy.

torchdiffeq is flow_matching's own backend (and maintained by one of the Dormand-Prince-in-ML
authors), so calling it exactly as flow_matching's ``ODESolver.sample`` does gives flow_matching's
results, step for step. What this module adds: the count of model evaluations (adaptive
controllers and Adams correctors decide it at run time), the number of steps where torchdiffeq
reports them, outputs cast to the state's dtype (autocast) and the same output checks as the
fixed-step executor.

- ``ADAPTIVE_METHODS``: error-controlled step sizes (``atol``/``rtol``, torchdiffeq's RMS norm);
  "dopri5" is the package's ground-truth solver. "scipy_solver" is scipy's solve_ivp (LSODA) through
  numpy: CPU only, no gradients, as in torchdiffeq.
- ``MULTISTEP_METHODS``: Adams-Bashforth(-Moulton) on the fixed grid (``step_size`` / time_grid);
  the first steps are RK4 steps and the implicit corrector iterates up to 4 times, so the NFE is
  not a fixed multiple of the steps (``return_stats`` reports it).

The explicit fixed-grid methods ("euler", "midpoint", "heun2", "heun3", "rk4") are not here: they
run as executor programs (solvers/tableaus.py), with the same arithmetic.
"""

from __future__ import annotations

import math

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torchdiffeq import odeint

from ..groundtruth.inputs import check_velocity
from .stats import ForwardCounter, SampleStats

__all__ = ["ADAPTIVE_METHODS", "MULTISTEP_METHODS", "TORCHDIFFEQ_METHODS", "solve_adaptive", "odeint_explained",
           "check_tolerances"]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")
# "fixed_adams" is torchdiffeq's older name of "implicit_adams" (the same solver).
MULTISTEP_METHODS = ("explicit_adams", "implicit_adams", "fixed_adams")
TORCHDIFFEQ_METHODS = (*ADAPTIVE_METHODS, *MULTISTEP_METHODS)


class _Field:
    """torchdiffeq's func(t, x): model(x, t, **extras), counted, checked once, cast to x's dtype.

    Multistep solvers also get ``callback_step`` (torchdiffeq calls it once per fixed-grid step),
    which counts the steps; other methods do not get it (scipy_solver would warn about it).
    """

    def __init__(self, model: Callable, extras: dict, method: str):
        self.model, self.extras, self.method = model, extras, method
        self.counter = ForwardCounter(model)
        self.calls = 0
        self.steps = 0
        if method in MULTISTEP_METHODS:
            self.callback_step = self._count_step

    def _count_step(self, t0, y0, dt) -> None:
        self.steps += 1

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        v = self.model(x, t, **self.extras)
        if torch.is_tensor(v) and v.dtype != x.dtype and v.is_floating_point():
            v = v.to(x.dtype)  # autocast: half-precision outputs for a float32 state
        if self.calls == 0:
            check_velocity(v, x, t, self.method)
            self.counter.after_first_eval()
        self.calls += 1
        return v


def check_tolerances(atol, rtol) -> None:
    """atol and rtol must be positive finite numbers (a one-element tensor too, as torchdiffeq takes)."""
    for label, tol in (("atol", atol), ("rtol", rtol)):
        value = tol
        if torch.is_tensor(tol) and tol.numel() == 1 and (tol.is_floating_point() or tol.dtype in (torch.int32, torch.int64)):
            value = float(tol)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{label} must be a positive number, got {tol!r}")


def odeint_explained(func, y0, time_grid: Tensor, *, method: str, atol, rtol, options: dict, x0: Tensor):
    """torchdiffeq's odeint(func, y0, time_grid, ...) (y0 a tensor or a tuple of them), except that an empty
    batch ``x0`` returns its constant trajectory (the step control would underflow on an empty norm) and
    the step size's underflow (torchdiffeq's bare AssertionError) becomes a ValueError naming its usual
    causes."""
    if x0.numel() == 0:
        def constant(y: Tensor) -> Tensor:
            return y.unsqueeze(0).expand(len(time_grid), *y.shape).clone()
        return tuple(constant(y) for y in y0) if isinstance(y0, tuple) else constant(y0)
    try:
        return odeint(func, y0, time_grid, method=method, atol=atol, rtol=rtol, options=options)
    except AssertionError as exc:
        if "underflow" not in str(exc):
            raise
        eps = torch.finfo(x0.dtype).eps
        tol = min(float(torch.as_tensor(atol).min()), float(torch.as_tensor(rtol).min()))
        if not bool(torch.isfinite(x0).all()):
            cause = "x0 holds NaN or inf"
        elif tol < eps:
            # the error estimate cannot fall below the state's rounding: the step shrinks until it vanishes
            cause = (f"a {str(x0.dtype).replace('torch.', '')} state resolves about {eps:.1e}, coarser than these "
                     f"tolerances: solve in float32 (x0.float()), or use atol and rtol of at least {eps:.0e}")
        else:
            cause = ("the model's velocity is probably not finite (NaN or inf) somewhere on the way, or the field is "
                     "too stiff for these tolerances")
        raise ValueError(f"method {method!r}: the adaptive step size underflowed to 0 (torchdiffeq: {exc}): "
                         f"{cause}; atol={atol}, rtol={rtol}") from exc


def solve_adaptive(model: Callable, x0: Tensor, time_grid: Tensor, *, atol: float, rtol: float,
                   extras: dict, enable_grad: bool = False, method: str = "dopri5",
                   step_size: Optional[float] = None) -> Tuple[Tensor, SampleStats]:
    """Solve dx/dt = model(x, t, **extras) through ``time_grid`` with torchdiffeq's ``method``;
    returns ([T, *x0.shape], stats).

    Called as flow_matching calls it: ``odeint(func, x0, time_grid, method=method, atol=atol,
    rtol=rtol, options={"step_size": step_size} if given)``. Tolerances are per element, mixed:
    |error| <= atol + rtol |x| (torchdiffeq's RMS norm).
    """
    if method not in TORCHDIFFEQ_METHODS:
        raise ValueError(f"method {method!r} does not run through torchdiffeq here; one of {TORCHDIFFEQ_METHODS}")
    field = _Field(model, extras, method)
    options = {"step_size": step_size} if step_size is not None else {}
    with torch.set_grad_enabled(enable_grad):
        traj = odeint_explained(field, x0, time_grid.to(x0.device), method=method, atol=atol, rtol=rtol,
                                options=options, x0=x0)
    steps = field.steps if method in MULTISTEP_METHODS else None
    stats = SampleStats(nfe=field.calls, network_forwards=field.calls * field.counter.per_eval,
                        steps=steps, method=method)
    return traj, stats
