"""Gaussian probability paths x_t = alpha_t x1 + sigma_t x0 (t = 0 noise, t = 1 data).

A schedule gives alpha_t, sigma_t and their time derivatives alpha'_t, sigma'_t as elementwise
functions of a time tensor. All functions keep the autograd graph of ``t`` (the adapters
built on them must stay differentiable in t) and compute in ``t``'s dtype.

    OT (conditional optimal transport): alpha = t,            sigma = 1 - t
    cosine:                             alpha = sin(pi t / 2), sigma = cos(pi t / 2)
    VP (DDPM limit, this time convention):
        alpha = xi(1 - t),  sigma = sqrt(1 - xi(1 - t)^2),
        xi(s) = exp(-s^2 (B - b) / 4 - s b / 2),  B = beta_max = 20, b = beta_min = 0.1
    custom: user callables, derivatives by autograd when not given.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = [
    "Schedule",
    "OTSchedule",
    "CosineSchedule",
    "VPSchedule",
    "CustomSchedule",
    "get_schedule",
    "SCHEDULES",
]


class Schedule:
    """Base class: alpha(t), sigma(t), d_alpha(t), d_sigma(t) on tensors."""

    name = "schedule"

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dict(self) -> dict:
        """A JSON-serialisable description (model cards store it); ``get_schedule`` reads it back."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "name")
        return f"{type(self).__name__}({args})"


class OTSchedule(Schedule):
    """alpha = t, sigma = 1 - t; alpha' = 1, sigma' = -1."""

    name = "ot"

    def alpha(self, t):
        return t

    def sigma(self, t):
        return 1.0 - t

    def d_alpha(self, t):
        # ones_like would cut the graph to t; the derivative is constant, so that is exact anyway.
        return torch.ones_like(t)

    def d_sigma(self, t):
        return -torch.ones_like(t)


class CosineSchedule(Schedule):
    """alpha = sin(pi t/2), sigma = cos(pi t/2); alpha' = (pi/2) cos(pi t/2), sigma' = -(pi/2) sin(pi t/2)."""

    name = "cosine"

    def alpha(self, t):
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t):
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t):
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_sigma(self, t):
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class VPSchedule(Schedule):
    """Variance preserving path of score-SDE / DDPM, with t = 0 noise and t = 1 data.

    With s = 1 - t and the integrated noise rate
        log xi(s) = -s^2 (B - b) / 4 - s b / 2,
    alpha = xi(s), sigma = sqrt(1 - xi(s)^2). By the chain rule (ds/dt = -1):
        alpha' = -xi'(s) = xi(s) (s (B - b) / 2 + b / 2)
        sigma' = -alpha alpha' / sigma          (from alpha^2 + sigma^2 = 1)
    sigma' diverges at t = 1 (sigma = 0); alpha never vanishes (alpha(0) = xi(1) ~ 6.6e-3 for the
    defaults). Adapters clamp t away from the ends for that reason.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        if not (beta_min >= 0 and beta_max > beta_min):
            raise ValueError(f"VPSchedule needs 0 <= beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def _log_xi(self, s):
        return -0.25 * s * s * (self.beta_max - self.beta_min) - 0.5 * s * self.beta_min

    def alpha(self, t):
        return torch.exp(self._log_xi(1.0 - t))

    def sigma(self, t):
        # 1 - xi^2 = -expm1(2 log xi): accurate near t = 1 where xi -> 1.
        return torch.sqrt(-torch.expm1(2.0 * self._log_xi(1.0 - t)))

    def d_alpha(self, t):
        s = 1.0 - t
        return self.alpha(t) * (0.5 * s * (self.beta_max - self.beta_min) + 0.5 * self.beta_min)

    def d_sigma(self, t):
        return -self.alpha(t) * self.d_alpha(t) / self.sigma(t)

    def to_dict(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max}


def _autograd_derivative(fn: Callable[[torch.Tensor], torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    """d fn / dt elementwise, for an elementwise fn, keeping the graph to t when t needs grad.

    Outside a graph (no_grad / inference mode) the derivative is computed on a detached copy of t
    in a local autograd scope, so it also works while sampling.
    """
    if t.requires_grad and torch.is_grad_enabled():
        (g,) = torch.autograd.grad(fn(t).sum(), t, create_graph=True)
        return g
    with torch.inference_mode(False), torch.enable_grad():
        tt = t.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(tt).sum(), tt)
    return g.detach()


class CustomSchedule(Schedule):
    """A schedule from user callables ``alpha_fn(t)``, ``sigma_fn(t)`` (elementwise on tensors).

    The derivatives come from ``d_alpha_fn`` / ``d_sigma_fn`` when given, otherwise from autograd
    (so the callables must be written with torch operations).
    """

    def __init__(
        self,
        alpha_fn: Callable,
        sigma_fn: Callable,
        d_alpha_fn: Optional[Callable] = None,
        d_sigma_fn: Optional[Callable] = None,
        name: str = "custom",
    ):
        for arg, fn in (("alpha_fn", alpha_fn), ("sigma_fn", sigma_fn)):
            if not callable(fn):
                raise ValueError(f"CustomSchedule: {arg} must be callable, got {type(fn).__name__}")
        for arg, fn in (("d_alpha_fn", d_alpha_fn), ("d_sigma_fn", d_sigma_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"CustomSchedule: {arg} must be callable or None, got {type(fn).__name__}")
        # public attributes: the model identity (models/identity.py) hashes them, code, closures and all
        self.alpha_fn, self.sigma_fn = alpha_fn, sigma_fn
        self.d_alpha_fn, self.d_sigma_fn = d_alpha_fn, d_sigma_fn
        self.name = name

    def alpha(self, t):
        return self.alpha_fn(t)

    def sigma(self, t):
        return self.sigma_fn(t)

    def d_alpha(self, t):
        return self.d_alpha_fn(t) if self.d_alpha_fn is not None else _autograd_derivative(self.alpha_fn, t)

    def d_sigma(self, t):
        return self.d_sigma_fn(t) if self.d_sigma_fn is not None else _autograd_derivative(self.sigma_fn, t)

    def to_dict(self):
        # Callables cannot be stored: a card naming a custom schedule cannot be reloaded from data.
        return {"name": self.name, "custom": True}


SCHEDULES = {"ot": OTSchedule, "cosine": CosineSchedule, "vp": VPSchedule}
_ALIASES = {"linear": "ot", "cond_ot": "ot", "cos": "cosine", "vp_sde": "vp"}


def get_schedule(schedule) -> Schedule:
    """Return a Schedule from a name ("ot", "cosine", "vp"), a dict from ``Schedule.to_dict``, or a
    Schedule instance (returned as is)."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, str):
        key = _ALIASES.get(schedule.lower(), schedule.lower())
        if key not in SCHEDULES:
            raise ValueError(f"schedule: unknown name {schedule!r}; expected one of {sorted(SCHEDULES)} or a Schedule instance")
        return SCHEDULES[key]()
    if isinstance(schedule, dict):
        opts = dict(schedule)
        name = opts.pop("name", None)
        if not isinstance(name, str) or _ALIASES.get(name.lower(), name.lower()) not in SCHEDULES:
            raise ValueError(f"schedule: dict must name one of {sorted(SCHEDULES)} under 'name', got {schedule!r}")
        try:
            return SCHEDULES[_ALIASES.get(name.lower(), name.lower())](**opts)
        except TypeError as exc:
            raise ValueError(f"schedule: bad options for {name!r}: {opts!r} ({exc})") from exc
    raise ValueError(f"schedule must be a name, a dict or a Schedule instance, got {type(schedule).__name__}")
