"""Adapters that turn other kinds of models into a velocity field u(x, t) (t = 0 noise, t = 1 data).

Every adapter is an ``nn.Module`` called as ``adapter(x, t, **extras)`` with ``t`` 0-dim or ``[B]``;
extras are passed through to the wrapped model. All stay differentiable in x and t.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ._time import as_time, batch_view, math_dtype
from .schedules import Schedule, get_schedule

__all__ = [
    "VelocityAdapter",
    "ClassifierFreeGuidance",
    "DiffusersTimeAdapter",
    "ScalarTimeAdapter",
    "PREDICTIONS",
    "DEFAULT_T_EPS",
]

PREDICTIONS = ("noise", "data", "velocity")
_PREDICTION_ALIASES = {"eps": "noise", "epsilon": "noise", "x0": "data", "x1": "data", "sample": "data", "v": "velocity"}

# Per prediction type: how far from the ends t is kept (see VelocityAdapter).
DEFAULT_T_EPS = {"noise": 1e-3, "data": 1e-3, "velocity": 0.0}


def _prediction_name(prediction: str) -> str:
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    key = _PREDICTION_ALIASES.get(prediction.lower(), prediction.lower())
    if key not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS} (or aliases {sorted(_PREDICTION_ALIASES)}), got {prediction!r}")
    return key


def _first_output(out):
    """Unwrap model outputs that are not plain tensors (diffusers returns an object with .sample)."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a tuple starting with one, or an object with .sample")


class VelocityAdapter(nn.Module):
    """u(x, t) = beta_t x + gamma_t f(x, t) for a model f trained on x_t = alpha_t x1 + sigma_t x0.

    Since x_t = alpha x1 + sigma x0 and u = alpha' x1 + sigma' x0, eliminating the unknown half:

    | prediction | f          | beta_t          | gamma_t                          |
    |------------|------------|-----------------|----------------------------------|
    | "noise"    | E[x0|x_t]  | alpha' / alpha  | sigma' - sigma alpha' / alpha    |
    | "data"     | E[x1|x_t]  | sigma' / sigma  | alpha' - alpha sigma' / sigma    |
    | "velocity" | u          | 0               | 1                                |

    Ends of the path: for "noise" the division by alpha blows up where alpha = 0 (t = 0 for OT and
    cosine), and sigma' diverges at t = 1 for VP; for "data" the division by sigma blows up at t = 1.
    The adapter therefore clamps the time to [t_eps, 1 - t_eps] before computing the coefficients
    and before calling the model. Default t_eps: 1e-3 for "noise" and "data" (the velocity is then
    taken from t = 1e-3 / 1 - 1e-3: an O(t_eps) change of the path, far below the solver errors of
    interest), 0 for "velocity" (nothing to divide, no clamp). The clamp has zero gradient outside
    the interval, which only matters at the very ends.

    Args:
        model: callable ``model(x, t, **extras)`` returning f of x's shape.
        prediction: "noise", "data" or "velocity" (aliases: eps/epsilon, x0/x1/sample, v).
        schedule: name ("ot", "cosine", "vp"), dict, or Schedule the model was trained with.
        t_eps: the clamp margin; None picks the default per prediction type.
    """

    def __init__(self, model, prediction: str = "velocity", schedule="ot", t_eps: Optional[float] = None):
        super().__init__()
        if not callable(model):
            raise ValueError(f"model must be callable as model(x, t, **extras), got {type(model).__name__}")
        self.model = model
        self.prediction = _prediction_name(prediction)
        self.schedule: Schedule = get_schedule(schedule)
        if t_eps is None:
            t_eps = DEFAULT_T_EPS[self.prediction]
        if not (0.0 <= float(t_eps) < 0.5):
            raise ValueError(f"t_eps must be in [0, 0.5), got {t_eps}")
        self.t_eps = float(t_eps)

    def coefficients(self, t: torch.Tensor):
        """(beta_t, gamma_t, clamped t) for a time tensor t (any shape)."""
        if self.t_eps > 0:
            t = t.clamp(self.t_eps, 1.0 - self.t_eps)
        if self.prediction == "velocity":
            return torch.zeros_like(t), torch.ones_like(t), t
        s = self.schedule
        a, sg, da, dsg = s.alpha(t), s.sigma(t), s.d_alpha(t), s.d_sigma(t)
        if self.prediction == "noise":
            beta = da / a
            return beta, dsg - sg * beta, t
        beta = dsg / sg
        return beta, da - a * beta, t

    def forward(self, x: torch.Tensor, t, **extras) -> torch.Tensor:
        # t, the clamp and the schedule in at least float32 (a bf16 model's x is bf16: in bf16, t near 1 and
        # 1 - t_eps round to 1, sigma to 0, and the coefficients to inf); the model itself gets t in x's
        # dtype, as before (a bf16 network may feed t to a bf16 layer)
        md = math_dtype(x.dtype)
        t = as_time(t, x, dtype=md)
        if self.prediction == "velocity":  # u = f: no coefficients to form
            tc = t.clamp(self.t_eps, 1.0 - self.t_eps) if self.t_eps > 0 else t
            return _first_output(self.model(x, tc.to(x.dtype), **extras))
        beta, gamma, tc = self.coefficients(t)
        f = _first_output(self.model(x, tc.to(x.dtype), **extras))
        u = batch_view(beta, x) * x.to(md) + batch_view(gamma, x) * f.to(md)
        return u.to(x.dtype)

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}, schedule={self.schedule!r}, t_eps={self.t_eps}"


def _repeat_extra(value, batch: int):
    """Duplicate per-sample extras along the batch for the [cond; uncond] call; leave the rest."""
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return torch.cat([value, value], dim=0)
    return value


class ClassifierFreeGuidance(nn.Module):
    """Guided velocity u_w = (1 + w) u(x, t | c) - w u(x, t | empty), in one batched model call.

    The conditional and unconditional halves are concatenated along the batch, so one guided
    evaluation is one NFE but two network forwards (``network_forwards`` counts the latter, ``nfe``
    the former; ``reset_counters()`` zeroes both).

    Convention: libraries that write u_uncond + g (u_cond - u_uncond) use g = 1 + w; w = 0 (g = 1)
    is the plain conditional model, w = -1 (g = 0) the unconditional one.

    Other extras: a tensor whose leading dimension equals the batch is taken as per-sample and
    duplicated for the two halves; anything else is passed to both as it is. A constant tensor extra
    whose leading dimension could equal a batch size (training calls the model on batches of many
    sizes) should carry a leading 1 instead, shape [1, ...], and broadcast.

    Args:
        model: a velocity model ``model(x, t, **extras)`` that reads the condition from
            ``extras[cond_key]`` (wrap noise/data predictors in VelocityAdapter first).
        guidance_scale: w.
        cond_key: the keyword under which the condition is passed.
        null_value: the "empty" condition: a number (e.g. the null class index) or a tensor of one
            sample's condition shape; it is broadcast to the condition's shape.
    """

    identity_ignore = ("network_forwards", "nfe")  # counters: not part of the model's identity (identity.py)

    def __init__(self, model, guidance_scale: float, cond_key: str = "label", null_value=0):
        super().__init__()
        if not callable(model):
            raise ValueError(f"model must be callable as model(x, t, **extras), got {type(model).__name__}")
        try:
            self.guidance_scale = float(guidance_scale)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"guidance_scale must be a number, got {guidance_scale!r}") from exc
        if not isinstance(cond_key, str) or not cond_key:
            raise ValueError(f"cond_key must be a non-empty string, got {cond_key!r}")
        if null_value is None:
            raise ValueError("null_value must be given (the condition meaning 'empty')")
        self.model = model
        self.cond_key = cond_key
        self.null_value = null_value
        self.network_forwards = 0
        self.nfe = 0

    def reset_counters(self) -> None:
        self.network_forwards = 0
        self.nfe = 0

    def forward(self, x: torch.Tensor, t, **extras) -> torch.Tensor:
        if self.cond_key not in extras:
            raise ValueError(f"ClassifierFreeGuidance needs the condition as keyword {self.cond_key!r} (cond_key); got extras {sorted(extras)}")
        b = x.shape[0]
        t = as_time(t, x)
        cond = torch.as_tensor(extras.pop(self.cond_key), device=x.device)
        if cond.dim() == 0:
            cond = cond.expand(b)
        if cond.shape[0] != b:
            raise ValueError(f"condition {self.cond_key!r} must have leading dimension B = {b}, got shape {tuple(cond.shape)}")
        null = torch.as_tensor(self.null_value, device=x.device, dtype=cond.dtype).expand_as(cond)
        x2 = torch.cat([x, x], dim=0)
        t2 = t if t.dim() == 0 else torch.cat([t, t], dim=0)
        rest = {k: _repeat_extra(v, b) for k, v in extras.items()}
        rest[self.cond_key] = torch.cat([cond, null], dim=0)
        out = _first_output(self.model(x2, t2, **rest))
        self.network_forwards += 2
        self.nfe += 1
        md = math_dtype(out.dtype)
        u_c, u_u = out[:b].to(md), out[b:].to(md)
        w = self.guidance_scale
        return ((1.0 + w) * u_c - w * u_u).to(out.dtype)  # the difference of two close halves in >= float32

    def extra_repr(self) -> str:
        return f"guidance_scale={self.guidance_scale} (g = {1 + self.guidance_scale}), cond_key={self.cond_key!r}"


class DiffusersTimeAdapter(nn.Module):
    """Call a model whose time runs the other way and is measured in training timesteps.

    Diffusers-style models take ``timestep`` in [0, num_train_timesteps] with large values = noise;
    here t = 0 is noise. The mapping is

        t_model = (1 - t) * timestep_scale,     timestep_scale = num_train_timesteps by default

    (pass ``timestep_scale=num_train_timesteps - 1`` for models trained on 0..N-1 exactly).
    Timesteps stay real-valued by default so the model stays differentiable in t; with
    ``round_timesteps=True`` they are rounded to integers, with a straight-through gradient.
    The output is unwrapped (``.sample`` or first tuple element). The prediction type is not
    changed: wrap this in VelocityAdapter (e.g. prediction="noise", schedule="vp"). The timestep is formed
    in at least float32 and passed in float32 for bf16/fp16 states too (in bf16 it moves in steps of 4 near
    1000), or in ``timestep_dtype`` when given (a network that feeds it to a bf16 layer: torch.bfloat16).
    """

    def __init__(self, model, num_train_timesteps: int = 1000, timestep_scale: Optional[float] = None,
                 round_timesteps: bool = False, timestep_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        if int(num_train_timesteps) <= 0:
            raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
        self.model = model
        self.num_train_timesteps = int(num_train_timesteps)
        self.timestep_scale = float(num_train_timesteps if timestep_scale is None else timestep_scale)
        if self.timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be positive, got {timestep_scale}")
        self.round_timesteps = bool(round_timesteps)
        self.timestep_dtype = timestep_dtype

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """t (0 = noise) -> the model's timestep (num_train_timesteps-ish = noise)."""
        tm = (1.0 - t) * self.timestep_scale
        if self.round_timesteps:
            tm = tm + (torch.round(tm) - tm).detach()  # integer values, identity gradient
        return tm

    def forward(self, x: torch.Tensor, t, **extras) -> torch.Tensor:
        # the mapping in at least float32 (a bf16 timestep is quantised to steps of 4 near 1000), passed in
        # that dtype unless timestep_dtype says otherwise: diffusers models take float32 timesteps and cast
        # their time embedding to their own dtype
        tm = self.model_time(as_time(t, x, dtype=math_dtype(x.dtype)))
        if self.timestep_dtype is not None:
            tm = tm.to(self.timestep_dtype)
        return _first_output(self.model(x, tm, **extras))

    def extra_repr(self) -> str:
        return f"timestep_scale={self.timestep_scale}, round_timesteps={self.round_timesteps}"


class ScalarTimeAdapter(nn.Module):
    """Give per-sample times to a model that accepts only one scalar time per call.

    A 0-dim t is passed straight through. For t of shape [B] the batch is split and the model is
    called once per group, so this is SLOW (up to B calls per evaluation):
    - when no gradient with respect to t is needed, samples are grouped by unique time value (the
      usual case: a training batch has one time per step, shared by many samples);
    - when t requires grad, the model is called once per sample with that sample's own 0-dim slice
      of t, so every sample's time gets exactly its own gradient.

    ``time_as="tensor"`` passes a 0-dim tensor; ``"float"`` passes a Python float, which cuts the
    graph: the gradient with respect to t is then zero (a warning says so once).
    """

    identity_ignore = ("calls", "_warned")  # a counter, a warned-once flag: not the model's identity (identity.py)

    def __init__(self, model, time_as: str = "tensor"):
        super().__init__()
        if not callable(model):
            raise ValueError(f"model must be callable, got {type(model).__name__}")
        if time_as not in ("tensor", "float"):
            raise ValueError(f"time_as must be 'tensor' or 'float', got {time_as!r}")
        self.model = model
        self.time_as = time_as
        self.calls = 0
        self._warned = False

    def _call(self, x, t0, extras):
        self.calls += 1
        if self.time_as == "float":
            if t0.requires_grad and not self._warned:
                warnings.warn("ScalarTimeAdapter(time_as='float'): the gradient with respect to t is zero", stacklevel=3)
                self._warned = True
            t0 = float(t0)
        return _first_output(self.model(x, t0, **extras))

    def forward(self, x: torch.Tensor, t, **extras) -> torch.Tensor:
        t = as_time(t, x)
        if t.dim() == 0:
            return self._call(x, t, extras)
        b = x.shape[0]

        def rows(idx):
            return {k: (v[idx] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v) for k, v in extras.items()}

        if t.requires_grad and torch.is_grad_enabled():
            outs = [self._call(x[i : i + 1], t[i], rows(slice(i, i + 1))) for i in range(b)]
            return torch.cat(outs, dim=0)
        values, inverse = torch.unique(t, return_inverse=True)
        out = None
        for j in range(values.shape[0]):
            idx = (inverse == j).nonzero(as_tuple=True)[0]
            f = self._call(x[idx], values[j], rows(idx))
            if out is None:
                out = f.new_empty((b, *f.shape[1:]))
            out[idx] = f
        return out
