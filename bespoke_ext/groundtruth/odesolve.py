"""Reference trajectories: the model's ODE solved by adaptive Dormand-Prince 5(4) (method.md §1).

    dx/dt = u(x, t),  x(0) = x0,  solved by torchdiffeq's dopri5 at rtol = atol = 1e-5 or tighter.

Two choices here matter for the ground truth being ground truth:
- The error norm is the largest per-sample RMS in the batch, not the RMS over the whole batch
  (torchdiffeq's default). With the default, one hard sample among many easy ones is solved to a
  much looser tolerance than asked: measured on a sharp 64-D Gaussian mixture at rtol = atol = 1e-5,
  the batch-RMS norm left an error of 3e-4 at t = 1, the per-sample max norm 2e-6.
- A batch shares one adaptive step sequence, so a sample's solution depends (at the tolerance level)
  on which samples it was solved with. Samples are therefore solved in fixed groups (``group_size``)
  in a fixed order; callers that split work across processes split along group boundaries, which
  keeps results independent of the number of processes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .inputs import check_velocity, rows_of

__all__ = ["solve_trajectories", "per_sample_max_rms", "check_tolerance", "DEFAULT_TOL"]

DEFAULT_TOL = 1e-5


def per_sample_max_rms(v: Tensor) -> Tensor:
    """max over the batch of the per-sample RMS: the error norm the adaptive step control uses."""
    if v.dim() == 0:
        return v.abs()
    return v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt().max()


def check_tolerance(rtol: float, atol: float) -> None:
    for name, value in (("gt_rtol", rtol), ("gt_atol", atol)):
        if not (isinstance(value, (int, float)) and 0 < value <= 1e-5):
            raise ValueError(
                f"{name} must be in (0, 1e-5] (ground truth is solved at rtol = atol = 1e-5 or tighter), got {value!r}")


class _Field(torch.nn.Module):
    """f(t, x) = u(x, t) with t expanded per sample (models may require [B] times); counts calls and
    remembers the first time at which the model returned NaN or inf (as tensors: no host sync per call)."""

    def __init__(self, model: Callable, extras: dict):
        super().__init__()
        self.model, self.extras, self.calls = model, extras, 0
        self.cond: dict = {}   # the current group's per-sample conditions (leading dimension = the group)
        self.bad: Optional[Tensor] = None    # any non-finite output so far (0-dim bool)
        self.bad_t: Optional[Tensor] = None  # the time of the first one

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        self.calls += 1
        v = self.model(x, t.to(x.dtype).expand(x.shape[0]), **self.extras, **self.cond)
        check_velocity(v, x, t, "dopri5 (ground truth)")   # the probe saw a batch of 2; this is every batch
        if torch.is_tensor(v):
            bad = ~torch.isfinite(v).all()
            if self.bad is None:
                self.bad, self.bad_t = bad, t.detach().double().clone()
            else:
                self.bad_t = torch.where(bad & ~self.bad, t.detach().double(), self.bad_t)
                self.bad = self.bad | bad
        return v

    def check_finite(self, start: int, size: int) -> None:
        """A clear error if the model returned NaN or inf while samples start .. start + size - 1 were solved."""
        if self.bad is not None and bool(self.bad):
            raise ValueError(
                f"the model returned NaN or inf during the ground-truth solve (dopri5) of samples {start}..{start + size - 1}, "
                f"first at t = {float(self.bad_t):.6g}: ground truth needs a finite velocity at every time in [0, 1] "
                f"and at every state the solve visits (check the model near that time, or its inputs there)")


@torch.no_grad()
def solve_trajectories(model: Callable, x0: Tensor, times: Tensor, *, rtol: float = DEFAULT_TOL,
                       atol: float = DEFAULT_TOL, model_extras: Optional[dict] = None,
                       group_size: int = 512, progress=None, stats: Optional[dict] = None,
                       conditions: Optional[dict] = None) -> Tensor:
    """x(times) for every sample: a tensor [T, B, *shape] with x(times[0]) = x0.

    Args:
        model: velocity field ``model(x, t, **extras)``.
        x0: [B, *shape] initial states at ``times[0]``.
        times: [T] strictly increasing times (detached here: the solve is data, not a graph).
        rtol, atol: dopri5 tolerances.
        model_extras: keyword arguments passed to every model call.
        group_size: samples per adaptive solve (see the module note).
        progress: optional tqdm-like bar, advanced by the number of samples solved.
        stats: optional dict; ``stats["nfe"]`` is increased by the model calls made (batched calls).
        conditions: per-sample model inputs {name: Tensor [B, ...]}, one row per sample of x0 (inputs.py);
            each group is solved with its own rows.
    Returns the states in x0's dtype.
    """
    from torchdiffeq import odeint

    if x0.dim() < 1 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch [B, *shape], got shape {tuple(x0.shape)}")
    times = torch.as_tensor(times).detach()
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(f"times must be a 1-D tensor of at least 2 times, got shape {tuple(times.shape)}")
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError(f"times must be strictly increasing, got {times.tolist()}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    # Times stay float64 inside the solver (accurate step placement); the model sees x's dtype.
    times = times.to(device=x0.device, dtype=torch.float64)
    field = _Field(model, dict(model_extras or {}))
    cond = dict(conditions or {})
    for name, v in cond.items():
        if v.shape[0] != x0.shape[0]:
            raise ValueError(f"conditions[{name!r}] has {v.shape[0]} rows for {x0.shape[0]} samples")
    out = []
    for start in range(0, x0.shape[0], group_size):
        group = x0[start:start + group_size]
        field.cond = rows_of(cond, slice(start, start + group_size))
        field.bad = field.bad_t = None
        try:
            # step_t: the last step lands on the end time instead of overshooting it and interpolating
            # back (torchdiffeq's default): the model is only evaluated inside [times[0], times[-1]], so a
            # field defined on [0, 1] only (sqrt(1 - t)) has ground truth
            states = odeint(field, group, times, rtol=rtol, atol=atol, method="dopri5",
                            options=dict(norm=per_sample_max_rms, step_t=times[-1:]))
        except Exception:
            # a non-finite velocity surfaces inside torchdiffeq as "underflow in dt" (its step size control
            # does not recover from a NaN error estimate)
            field.check_finite(start, group.shape[0])
            raise
        field.check_finite(start, group.shape[0])  # a solve that ran on through inf
        out.append(states)
        if progress is not None:
            progress.update(group.shape[0])
    if stats is not None:
        stats["nfe"] = stats.get("nfe", 0) + field.calls
    return torch.cat(out, dim=1)
