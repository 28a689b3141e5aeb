"""``compute_likelihood``: a drop-in for flow_matching's ``ODESolver(model).compute_likelihood``.

The log-likelihood of data x_1 under the flow comes from the reverse ODE (t from 1 to 0) of the
augmented state (x, l):

    dx/dt = u(x, t),    dl/dt = div_x u(x, t),    x(1) = x_1,  l(1) = 0,
    log p_1(x_1) = log p_0(x(0)) + l(0)          (l(0) = -int_0^1 div u dt)

exactly flow_matching's formulation (its dynamics return (u, div) and it integrates from 1 to 0).
The divergence is exact (one backward pass per dimension, summed in dimension order) or
Hutchinson's estimator z^T (du/dx) z with one Rademacher z drawn per call.

How the augmented ODE is run
----------------------------
*Fixed-step methods* (every Runge-Kutta tableau of ``solvers.tableaus``: euler, midpoint, heun,
rk4, ...) run through ``sample`` and so through the executor, unchanged: the executor's slots all
hold one tensor of the state's shape and combine them with one fused op, so the augmented state
is packed as one flat tensor y = [x.flatten(1), l] of shape [B, D + 1] and an adapter
(``AugmentedVelocity``) turns the model into an ordinary velocity model on y, returning
[u.flatten(1), div]. Time grids, step sizes, ``nfe``, intermediates and gradients are therefore
exactly those of ``bx.sample`` (the same programs and arithmetic). The adapter is a plain bx model:
``bx.sample(AugmentedVelocity(model, shape, ...), y, time_grid=(1., 0.), ...)`` works too.

*Every other torchdiffeq method* (dopri5 and the other adaptive ones, the Adams methods, any
fixed-step method without a tableau here) goes to torchdiffeq with the tuple state (x, l), like
flow_matching, so the adaptive step controller sees the same mixed norm (the max of the two
parts' RMS norms) and takes the same steps.

Why a flat [B, D + 1] state and not a (x, l) tuple in the executor: the executor and its fused
op work on one tensor per slot (no tuple states), and the packed state keeps the batch leading,
so extras with a batch dimension and learned solvers (``solver=``, on the time-reversed field)
apply to the augmented ODE as to any model; the cost is one copy of x per evaluation. The log-density column
is integrated with the same coefficients as x, which is what torchdiffeq does with a tuple.

Differences from flow_matching (all where flow_matching fails or drops information):

- ``enable_grad=True`` gives the true gradients through the solve: the divergence is built with
  ``create_graph=True`` and the dynamics are not detached, so gradients reach x_1, the model's
  parameters and tensor extras through both the velocity and the divergence. flow_matching detaches
  the dynamics' outputs, so its x_1-gradient ignores the flow's Jacobian and its parameters get
  none. The values (x_0, log-likelihood) are the same either way.
- The exact divergence works for any per-sample shape (flow_matching's indexes ``u[:, i]`` and so
  handles [B, D] only); for [B, D] it is the same sum in the same order.
- Hutchinson's z is cast to x_1's dtype (its values are +-1, exact), so float64 works
  (flow_matching raises a dtype error there).
- Arguments are checked (a time grid that does not run from 1 to 0 is a ValueError, not an assert).

Matching flow_matching's Hutchinson numbers
-------------------------------------------
z is drawn exactly as flow_matching draws it, ``(torch.randn_like(x_1) < 0) * 2.0 - 1.0`` from
the default generator of x_1's device, once per call and before any model evaluation. Seeding
that generator to the same value right before each call (``torch.manual_seed(s)``; it seeds the
CUDA generators too) therefore gives both libraries the same z and the same results. Nothing else
here draws random numbers, so a call consumes exactly what flow_matching's consumes.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from .adaptive import check_tolerances, odeint_explained

from ..solvers.tableaus import TABLEAUS, canonical_method
from ..solvers.time_grid import as_time_grid, check_step_size, refuse_grid_gradients
from ..groundtruth.inputs import as_positional, check_velocity, model_call_dtype, velocity_of
from .sample import _cast_outputs, _check_extras, sample
from .stats import ForwardCounter, SampleStats

__all__ = ["compute_likelihood", "AugmentedVelocity", "divergence", "rademacher_like"]

_TORCHDIFFEQ_ADAPTIVE = ("dopri8", "dopri5", "bosh3", "fehlberg2", "adaptive_heun", "scipy_solver")
_TORCHDIFFEQ_FIXED = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")


def rademacher_like(x_1: Tensor) -> Tensor:
    """flow_matching's Hutchinson probe: +-1 from ``torch.randn_like(x_1) < 0`` (same draw, same
    generator), in x_1's dtype."""
    z = (torch.randn_like(x_1).to(x_1.device) < 0) * 2.0 - 1.0
    return z.to(x_1.dtype)


def divergence(u: Tensor, x: Tensor, z: Optional[Tensor] = None, *, create_graph: bool = False) -> Tensor:
    """div_x u per sample, shape [B]: exact (z None; one backward per dimension, summed in
    dimension order like flow_matching) or Hutchinson's z^T (du/dx) z.

    ``create_graph`` keeps the divergence differentiable; the exact branch always builds the graph, as
    flow_matching does, whose numbers it reproduces bit for bit (the differentiable backward formulas
    round otherwise than the plain ones; it costs about 1.6x the plain backward).

    ``x`` must require grad and ``u`` must have been computed from it with autograd on.
    """
    if not u.requires_grad:
        raise RuntimeError(
            "compute_likelihood needs the divergence of the velocity: the model's output carries no "
            "autograd graph (does it run under torch.no_grad / inference_mode, or detach its output?)")
    if z is None:
        uf = u.flatten(1)
        d = uf.shape[1]
        div = 0
        for i in range(d):
            # create_graph=True always, as flow_matching: autograd then runs the differentiable backward
            # formulas, whose rounding differs from the plain ones (4.8e-7 in Euler's log-likelihood, and
            # another step sequence for dopri5); the graph goes with the divergence unless it is kept
            (g,) = torch.autograd.grad(uf[:, i], x, torch.ones_like(uf[:, i]), allow_unused=True,
                                       retain_graph=True, create_graph=True)
            if g is not None:
                div = div + g.flatten(1)[:, i]
        if not torch.is_tensor(div):  # u does not depend on x at all
            div = u.new_zeros(u.shape[0])
        return div
    u_dot_z = torch.einsum("ij,ij->i", u.flatten(start_dim=1), z.flatten(start_dim=1))
    (g,) = torch.autograd.grad(u_dot_z, x, torch.ones_like(u_dot_z), allow_unused=True, create_graph=create_graph)
    if g is None:
        return u.new_zeros(u.shape[0])
    return torch.einsum("ij,ij->i", g.flatten(start_dim=1), z.flatten(start_dim=1))


class AugmentedVelocity:
    """The augmented ODE as a velocity model on flat states y = [x.flatten(1), l], [B, D + 1]:
    returns [u(x, t).flatten(1), div_x u(x, t)] (exact, or Hutchinson with probe ``z``).

    ``differentiable=False``: autograd is used inside each call only (also when the caller runs in
    inference mode or no_grad) and the output is detached. ``differentiable=True``: the output
    keeps the graph to y, the model's parameters and extras (the divergence with create_graph).
    """

    def __init__(self, model: Callable, shape: Sequence[int], *, z: Optional[Tensor] = None,
                 differentiable: bool = False, extras: Optional[dict] = None, method: str = "likelihood"):
        self.model = model
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)
        self.z = z
        self.differentiable = differentiable
        self.extras = dict(extras or {})
        self.method = method
        self._checked = False

    @property
    def network_forwards(self):
        """The model's own forward counter (for SampleStats), if it keeps one."""
        return getattr(self.model, "network_forwards", None)

    def __call__(self, y: Tensor, t: Tensor, **extras) -> Tensor:
        b = y.shape[0]
        extras = {**self.extras, **extras}
        with torch.inference_mode(False), torch.enable_grad():
            x = y[:, :self.dim].reshape(b, *self.shape)
            if self.differentiable and x.requires_grad:
                x = x.contiguous()
            else:  # a fresh leaf: the model gets a contiguous tensor that autograd may differentiate
                x = x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
            u = self.model(x, t, **extras)
            if not self._checked:
                check_velocity(u, x, t, self.method)
                self._checked = True
            div = divergence(u, x, self.z, create_graph=self.differentiable)
            out = torch.cat([u.reshape(b, self.dim), div.reshape(b, 1).to(u.dtype)], dim=1)
        return out if self.differentiable else out.detach()


@torch.compiler.disable(reason="bespoke_ext.compute_likelihood runs eagerly, as sample() does")
def compute_likelihood(model: Callable, x_1: Tensor, log_p0: Callable[[Tensor], Tensor], *,
                       step_size: Optional[float], method: str = "euler", atol: float = 1e-5,
                       rtol: float = 1e-5, time_grid=(1.0, 0.0), return_intermediates: bool = False,
                       exact_divergence: bool = False, enable_grad: bool = False,
                       nfe: Optional[int] = None, return_stats: bool = False, **model_extras):
    """Log-likelihood of ``x_1`` under the flow of ``model`` (t = 0 source, t = 1 data).

    Drop-in for ``flow_matching.solver.ODESolver(model).compute_likelihood(x_1=x_1, ...)``: same
    arguments and results, ``(x_0, log_likelihood)`` with x_0 [B, ...] the source point reached at
    t = 0 and log_likelihood [B] = log_p0(x_0) + l(0); with ``return_intermediates`` the first item
    is the x-trajectory at the time_grid points, [T, B, ...] (the log-likelihood stays the final
    one).

    - ``time_grid``: must start at 1.0 and end at 0.0 (default (1.0, 0.0)); points in between are
      where intermediates are reported (and, without step_size/nfe, the fixed-step grid).
    - ``step_size``: fixed steps of this size from 1 towards 0 (last one shortened), as in
      flow_matching; None for adaptive methods (an error otherwise) and with ``nfe``.
    - ``method``: fixed-step Runge-Kutta methods ("euler", "midpoint", "heun"/"heun2", "rk4", and
      any other tableau in ``bespoke_ext.solvers.tableaus``) run through the executor, as
      ``bx.sample`` runs them; every other torchdiffeq method ("dopri5", "bosh3", "explicit_adams",
      ...) through torchdiffeq, with ``atol``/``rtol`` for the adaptive ones.
    - ``exact_divergence``: exact divergence (D backward passes per evaluation) or, by default,
      Hutchinson's estimator with one Rademacher z per call (see the module docstring for getting
      flow_matching's numbers: seed with ``torch.manual_seed`` before each call).
    - ``enable_grad``: keep the graph, so log_likelihood (and x_0) can be differentiated with
      respect to x_1, the model's parameters and tensor extras (true gradients, through the
      divergence as well). Otherwise the solve keeps no graph.
    - ``log_p0`` is called on x_0 after the solve, in the caller's autograd mode (as in
      flow_matching).

    Beyond flow_matching: ``nfe`` (exactly this many model evaluations with uniform steps, for the
    executor's methods) and ``return_stats`` (also return a SampleStats; ``nfe`` counts model
    evaluations, each of which costs D backward passes (exact) or one (Hutchinson)).
    ``model(x, t, **model_extras)`` is called with t a 0-dim tensor in x's dtype and must be
    differentiable in x. Under ``torch.compile`` it runs eagerly, as ``sample`` does (compile the model
    instead); an embedded model is used through its ``velocity``, as there.
    """
    model = velocity_of(model)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, **extras), got {type(model).__name__}")
    _check_extras(model_extras, "compute_likelihood", {
        "solver": "method= (the likelihood runs a fixed-step or torchdiffeq method; learned solvers are for "
                  "bx.sample(..., solver=))"})
    if not callable(log_p0):
        raise TypeError(f"log_p0 must be callable as log_p0(x_0) -> [B] log-densities, got {type(log_p0).__name__}")
    if not torch.is_tensor(x_1) or not x_1.is_floating_point() or x_1.dim() < 2:
        raise ValueError(f"x_1 must be a floating-point tensor [batch, ...] (at least 2-D), got "
                         f"{type(x_1).__name__ if not torch.is_tensor(x_1) else f'{x_1.dtype} of shape {tuple(x_1.shape)}'}")
    refuse_grid_gradients(time_grid, enable_grad)
    low = model_call_dtype(model)
    model = as_positional(model)
    if low is not None and x_1.dtype != low:   # a bf16/fp16 module: called in its own dtype, as sample() calls it
        model = _cast_outputs(model, low)
    grid = as_time_grid(time_grid)
    if float(grid[0]) != 1.0 or float(grid[-1]) != 0.0:
        raise ValueError(f"time_grid must start at 1.0 and end at 0.0 (the reverse ODE from data to source); "
                         f"got {grid.tolist()}")
    name = _method_name(method)

    # Drawn first, exactly as flow_matching does, so seeding gives both the same probe.
    z = None if exact_divergence else rademacher_like(x_1)
    shape = tuple(x_1.shape[1:])

    if name in TABLEAUS:
        aug = AugmentedVelocity(model, shape, z=z, differentiable=enable_grad, extras=model_extras,
                                method=name)
        with torch.set_grad_enabled(enable_grad):  # y1 carries x_1's graph only when asked
            y1 = torch.cat([x_1.reshape(x_1.shape[0], math.prod(shape)), x_1.new_zeros(x_1.shape[0], 1)], dim=1)
        out, stats = sample(aug, y1, method=name, step_size=step_size, nfe=nfe, time_grid=grid,
                            return_intermediates=return_intermediates, enable_grad=enable_grad,
                            return_stats=True)
        final = out[-1] if return_intermediates else out
        x_0 = final[:, :-1].reshape(x_1.shape)
        log_det = final[:, -1]
        xs = out[..., :-1].reshape(out.shape[0], *x_1.shape) if return_intermediates else x_0
        if not enable_grad:
            x_0, xs = x_0.contiguous(), xs.contiguous()
    else:
        if nfe is not None:
            raise ValueError(f"nfe applies to the executor's fixed-step methods {tuple(TABLEAUS)}; "
                             f"method {method!r} runs in torchdiffeq (use step_size or time_grid)")
        xs_all, log_dets, stats = _solve_torchdiffeq(model, x_1, z, grid, name, step_size=step_size,
                                                     atol=atol, rtol=rtol, enable_grad=enable_grad,
                                                     extras=model_extras)
        x_0, log_det = xs_all[-1], log_dets[-1]
        xs = xs_all if return_intermediates else x_0

    log_p = log_p0(x_0)
    # one value per sample: [B] (or [B, 1], a 0-dim value for one sample); a sum over the batch would be
    # added to every sample, and [B, 1] + [B] would broadcast to [B, B]
    if not torch.is_tensor(log_p) or log_p.numel() != x_1.shape[0] or (log_p.dim() and log_p.shape[0] != x_1.shape[0]):
        got = tuple(log_p.shape) if torch.is_tensor(log_p) else type(log_p).__name__
        raise ValueError(f"log_p0(x_0) must return one log-density per sample, shape [B] = [{x_1.shape[0]}], got "
                         f"{got} (a sum over the batch?)")
    log_likelihood = log_p.reshape(x_1.shape[0]) + log_det
    result = (xs, log_likelihood)
    return (*result, stats) if return_stats else result


def _method_name(method) -> str:
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, got {method!r}")
    low = method.lower()
    name = canonical_method(method)
    if name in TABLEAUS or low in _TORCHDIFFEQ_ADAPTIVE or low in _TORCHDIFFEQ_FIXED:
        return name
    raise ValueError(f"unknown method {method!r} for compute_likelihood; choose one of "
                     f"{tuple(dict.fromkeys((*TABLEAUS, *_TORCHDIFFEQ_FIXED, *_TORCHDIFFEQ_ADAPTIVE)))}")


def _solve_torchdiffeq(model: Callable, x_1: Tensor, z: Optional[Tensor], grid: Tensor, method: str, *,
                       step_size, atol, rtol, enable_grad: bool, extras: dict
                       ) -> Tuple[Tensor, Tensor, SampleStats]:
    """flow_matching's own solve: torchdiffeq on the tuple state (x, l)."""
    if method in _TORCHDIFFEQ_ADAPTIVE:
        if step_size is not None:
            raise ValueError(f"method {method!r} is adaptive: step_size applies to fixed-step methods; "
                             f"drop step_size={step_size!r}")
        check_tolerances(atol, rtol)
    else:
        check_step_size(step_size)
    counter = ForwardCounter(model)
    calls = 0

    def dynamics(t: Tensor, states):
        nonlocal calls
        xt = states[0]
        with torch.enable_grad():
            if not (enable_grad and xt.requires_grad):
                xt = xt.detach().requires_grad_(True)
            ut = model(xt, t, **extras)
            if calls == 0:
                check_velocity(ut, xt, t, method)
                counter.after_first_eval()
            calls += 1
            div = divergence(ut, xt, z, create_graph=enable_grad)
        if enable_grad:
            return ut, div.to(ut.dtype)
        return ut.detach(), div.detach().to(ut.dtype)

    y_init = (x_1, x_1.new_zeros(x_1.shape[0]))
    options = {"step_size": step_size} if step_size is not None else {}
    with torch.set_grad_enabled(enable_grad):
        xs, log_dets = odeint_explained(dynamics, y_init, grid.to(x_1.device), method=method, options=options,
                                        atol=atol, rtol=rtol, x0=x_1)
    stats = SampleStats(nfe=calls, network_forwards=calls * counter.per_eval, steps=None, method=method)
    return xs, log_dets, stats
