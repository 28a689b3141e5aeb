"""Bespoke solvers (Shaul et al., ICLR 2024): a learned re-timing and re-scaling of the flow ODE.

A trajectory is re-timed and re-scaled, xbar(r) = s(r) x(t(r)), which solves (method.md §2)

    dxbar/dr = ubar(xbar, r) = (s'(r) / s(r)) xbar + t'(r) s(r) u(xbar / s(r), t(r)).

A base Runge-Kutta method with n uniform steps h = 1/n in r, run on ubar and mapped back, is the
solver; only t, t' (dt), s, s' (ds) at the points the base method visits matter. Step i
(t_i -> t_{i+1}) in the original coordinates (method.md §3):

  order 1 (Euler base), 1 NFE:
      u1      = u(x_i, t_i)
      x_{i+1} = ((s_i + h ds_i) / s_{i+1}) x_i + (h dt_i s_i / s_{i+1}) u1
  order 2 (midpoint base), 2 NFE, with free half-point values (t_m, dt_m, s_m, ds_m):
      u1      = u(x_i, t_i)
      x_m     = ((s_i + (h/2) ds_i) / s_m) x_i + ((h/2) dt_i s_i / s_m) u1
      u2      = u(x_m, t_m)
      x_{i+1} = (s_i / s_{i+1}) x_i + (h ds_m / s_{i+1}) x_m + (h dt_m s_m / s_{i+1}) u2

Parametrization (method.md §4), valid for every real raw vector, identity (t = r, dt = 1, s = 1,
ds = 0: plain Euler / midpoint) exactly at raw = 0. With clamp(z) = B tanh(z / B), B = 20 (slope 1
near 0, bounded), and c = log(e - 1) (softplus(c) = 1):

  - time increments and dt: g(a) = softplus(clamp(c + a)) / softplus(clamp(c + 0)), a relative
    softplus. Numerator and denominator are the same op on tensors of the same shape, so at a = 0
    the ratio is exactly 1 (a plain softplus(c) is 1 only to rounding);
  - times: w_0 = 1 (fixed: the normalisation removes one degree of freedom), w_k = g(a_k),
    t_k = (sum_{j<k} w_j) / (sum_j w_j) over the n (order 1) or 2n (order 2, grid and half points
    interleaved) increments, so t_0 = 0 and t_end = 1 exactly (the total is the cumulative sum's
    last entry);
  - s = exp(clamp(a)) with s_0 = 1 fixed and s_n free; ds = a (free).
The clamp keeps every increment, dt and s positive and finite in floating point for any finite raw
value (unclamped, softplus and exp underflow to 0 or overflow), and bounds the ratio of two time
increments by softplus(B) / softplus(-B) ~ 1e10, so grid and half-point times stay strictly
increasing in float64, not only on paper.
Raw numbers: n*order - 1 time increments and n*order each of dt, s, ds: 4n - 1 (order 1) or
8n - 1 (order 2). dt and ds at r = 1 are not parameters: the base method never evaluates there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..integers import as_int
from ..program import Program, ProgramBuilder
from .files import SolverFileError, read_solver_file, write_solver_file
from .float64_module import Float64Module

__all__ = ["BespokeSolver", "BespokeGrid", "StepCoefficients"]

_BOUND = 20.0
_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) = 1
_RAW = ("time_logits", "dt_logits", "log_s", "ds")


def _clamp(z: Tensor) -> Tensor:
    """B tanh(z / B): slope 1 and value 0 at z = 0, bounded by B."""
    return _BOUND * torch.tanh(z / _BOUND)


def _relative_softplus(a: Tensor) -> Tensor:
    """softplus(clamp(c + a)) / softplus(clamp(c)): positive, bounded, exactly 1 at a = 0."""
    return F.softplus(_clamp(a + _SOFTPLUS_ONE)) / F.softplus(_clamp(torch.zeros_like(a) + _SOFTPLUS_ONE))


def _scale(a: Tensor) -> Tensor:
    """exp(clamp(a)): positive and finite, exactly 1 at a = 0."""
    return torch.exp(_clamp(a))


@dataclass(frozen=True)
class BespokeGrid:
    """t, dt, s, ds of a Bespoke solver (float64, differentiable in its raw parameters).

    t, s: [n+1] at the grid points r_i = i h (t_0 = 0, t_n = 1, s_0 = 1).
    dt, ds: [n] at r_0 .. r_{n-1} (where steps start; the field is never evaluated at r = 1).
    tm, dtm, sm, dsm: [n] at the half points r_i + h/2 (order 2 only, else None).
    """

    t: Tensor
    dt: Tensor
    s: Tensor
    ds: Tensor
    tm: Optional[Tensor] = None
    dtm: Optional[Tensor] = None
    sm: Optional[Tensor] = None
    dsm: Optional[Tensor] = None


@dataclass(frozen=True)
class StepCoefficients:
    """Per-step coefficients of the update formulas (float64, differentiable).

    stage_times [n, order]: model time of each stage (t_i; and t_m for order 2).
    order 1: update [n, 2] over (x_i, u1).
    order 2: mid [n, 2] over (x_i, u1); update [n, 3] over (x_i, x_m, u2).
    """

    stage_times: Tensor
    update: Tensor
    mid: Optional[Tensor] = None


class BespokeSolver(Float64Module):
    """A learnable n-step solver on an Euler (order 1) or midpoint (order 2) base.

    Identity-initialised: a fresh solver samples exactly like Euler / midpoint with the same NFE.
    Use with ``bespoke_ext.sample(model, x0, solver=solver)``; train with ``bespoke_ext.train``.
    """

    KIND = "BespokeSolver"
    identity_skip = True  # held next to a network, a solver is not part of the field (models/identity.py)

    def __init__(self, steps: int, order: int = 2):
        super().__init__()
        if as_int(steps) is None or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if isinstance(order, bool) or as_int(order) not in (1, 2):   # as_int: 2.0 is not an order
            raise ValueError(f"order must be 1 (Euler base) or 2 (midpoint base), got {order!r}")
        self.steps = as_int(steps)
        self.order = int(order)   # checked above: 1 or 2 (numpy integers included)
        f64 = dict(dtype=torch.float64)
        self.time_logits = nn.Parameter(torch.zeros(steps * order - 1, **f64))
        # Columns: order 1: (grid point i); order 2: (grid point i, half point of step i).
        self.dt_logits = nn.Parameter(torch.zeros(steps, order, **f64))
        # Columns: order 1: (s_{i+1}); order 2: (s_m of step i, s_{i+1}).
        self.log_s = nn.Parameter(torch.zeros(steps, order, **f64))
        self.ds = nn.Parameter(torch.zeros(steps, order, **f64))
        self.metadata: dict = {}
        self._programs: dict = {}  # intermediates -> (raw parameter values, Program); see program()

    # -- shape -----------------------------------------------------------------------------------

    @property
    def nfe(self) -> int:
        return self.order * self.steps

    @property
    def h(self) -> float:
        return 1.0 / self.steps

    @property
    def num_parameters(self) -> int:
        """Raw learnable scalars: 4n - 1 (order 1) or 8n - 1 (order 2)."""
        return sum(p.numel() for p in self.parameters())

    @property
    def method(self) -> str:
        return f"bespoke-rk{self.order}"

    def extra_repr(self) -> str:
        return f"steps={self.steps}, order={self.order}, nfe={self.nfe}"

    # -- parametrization ---------------------------------------------------------------------------

    def grid(self) -> BespokeGrid:
        """t, dt, s, ds (and the half-point values) from the raw parameters (method.md §4)."""
        like = self.time_logits
        one = torch.ones(1, dtype=torch.float64, device=like.device)
        w = torch.cat([one, _relative_softplus(self.time_logits.double())])
        total = torch.cumsum(w, 0)
        times = torch.cat([torch.zeros_like(one), total / total[-1]])
        dt = _relative_softplus(self.dt_logits.double())
        scales = _scale(self.log_s.double())
        s = torch.cat([one, scales[:, -1]])
        ds = self.ds.double()
        if self.order == 1:
            return BespokeGrid(t=times, dt=dt[:, 0], s=s, ds=ds[:, 0])
        return BespokeGrid(t=times[0::2], dt=dt[:, 0], s=s, ds=ds[:, 0],
                           tm=times[1::2], dtm=dt[:, 1], sm=scales[:, 0], dsm=ds[:, 1])

    def times(self) -> Tensor:
        """The states' time grid t_0 .. t_n (float64, detached)."""
        return self.grid().t.detach()

    def eval_times(self) -> Tensor:
        """Every model-evaluation time, in evaluation order (float64, detached)."""
        return self.step_coefficients().stage_times.reshape(-1).detach()

    def step_coefficients(self) -> StepCoefficients:
        """The update formulas' coefficients (module docstring), all steps at once."""
        g = self.grid()
        h = self.h
        s0, s1 = g.s[:-1], g.s[1:]
        if self.order == 1:
            update = torch.stack([(s0 + h * g.ds) / s1, h * g.dt * s0 / s1], dim=1)
            return StepCoefficients(stage_times=g.t[:-1, None], update=update)
        mid = torch.stack([(s0 + (h / 2) * g.ds) / g.sm, (h / 2) * g.dt * s0 / g.sm], dim=1)
        update = torch.stack([s0 / s1, h * g.dsm / s1, h * g.dtm * g.sm / s1], dim=1)
        return StepCoefficients(stage_times=torch.stack([g.t[:-1], g.tm], dim=1), update=update, mid=mid)

    def lipschitz(self, L_tau: float = 1.0) -> Tensor:
        """Lipschitz constants L_i [n] of the steps (method.md §5), Lbar_k = |ds_k| / s_k + dt_k L_tau:

            order 1: L_i = (s_i / s_{i+1}) (1 + h Lbar_i)
            order 2: L_i = (s_i / s_{i+1}) (1 + h Lbar_m (1 + (h/2) Lbar_i))
        """
        if isinstance(L_tau, bool) or not isinstance(L_tau, (int, float)) or not L_tau >= 0:
            raise ValueError(f"L_tau must be a non-negative number, got {L_tau!r}")
        g = self.grid()
        h = self.h
        ratio = g.s[:-1] / g.s[1:]
        lbar_i = g.ds.abs() / g.s[:-1] + g.dt * L_tau
        if self.order == 1:
            return ratio * (1 + h * lbar_i)
        lbar_m = g.dsm.abs() / g.sm + g.dtm * L_tau
        return ratio * (1 + h * lbar_m * (1 + (h / 2) * lbar_i))

    # -- sampling ----------------------------------------------------------------------------------

    def program(self, intermediates: bool = False) -> Program:
        """The executor's program, from step_coefficients(): what is trained is what samples.

        With ``intermediates`` the states at times() are recorded (n + 1 of them). The tables are
        step_coefficients() laid out in instruction order by two batched ops. Without autograd
        the program is memoised against a copy of the raw parameters (compared by value, so no
        way of changing them goes unnoticed): repeated sampling skips rebuilding it.
        """
        if torch.is_grad_enabled():
            return self._build_program(intermediates)
        memo = self._programs.get(intermediates)
        raw = [p.detach() for p in self.parameters()]
        if memo is not None and all(a.shape == b.shape and a.device == b.device and torch.equal(a, b)
                                    for a, b in zip(memo[0], raw)):
            return memo[1]
        program = self._build_program(intermediates)
        self._programs[intermediates] = ([r.clone() for r in raw], program)
        return program

    def _build_program(self, intermediates: bool) -> Program:
        c = self.step_coefficients()
        rows = [c.update] if self.order == 1 else [c.mid, c.update]
        b = ProgramBuilder(self.method)
        states = (b.buffer(), b.buffer())
        xm = b.buffer() if self.order == 2 else None
        u1 = b.velocity()
        u2 = b.velocity() if self.order == 2 else None
        x = b.input
        if intermediates:
            ones = torch.ones_like(c.update[:, :1])
            rows.append(ones)  # the copy x_{i+1} -> record i + 1, after each step
            record_times = self.times().cpu().tolist()
            b.record(record_times[0], (x,))
        for i in range(self.steps):
            out = states[i % 2]
            b.eval(u1, x)
            if self.order == 1:
                b.combine(out, (x, u1))
            else:
                b.combine(xm, (x, u1))
                b.eval(u2, xm)
                b.combine(out, (x, xm, u2))
            if intermediates:
                b.record(record_times[i + 1], (out,))
            b.end_step()
            x = out
        coeffs = torch.cat(rows, dim=1).reshape(-1)
        if intermediates:
            coeffs = torch.cat([ones[0], coeffs])  # the copy x_0 -> record 0
        return b.build(output=x, times=c.stage_times.reshape(-1), coeffs=coeffs)

    # -- files -------------------------------------------------------------------------------------

    def save(self, path: Union[str, os.PathLike], metadata: Optional[dict] = None) -> None:
        """Write a data-only solver file (solvers/files.py): raw parameters, order, steps and
        ``self.metadata`` updated with ``metadata`` (training info, a model tag, ...)."""
        info = {**self.metadata, **(metadata or {})}
        tensors = {name: getattr(self, name).detach().to(torch.float64) for name in _RAW}
        write_solver_file(path, kind=self.KIND, config={"order": self.order, "steps": self.steps},
                          tensors=tensors, info=info, check_schema=True)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location=None) -> "BespokeSolver":
        """Read a solver written by ``save``; SolverFileError naming the file for any other file.

        ``map_location``: where the solver goes, as for ``torch.load``: a device or a device string
        ("cuda:0"); None keeps it on the CPU. The file is checked whole (solvers/files.py: size caps,
        tensor names and shapes against the header's config, checksum, finite values) before the
        module is built, so a hostile file costs no more than its header. The checksum detects
        damage, not tampering: it is not a key (anyone can compute one); what makes loading safe is
        that it is data only and checked.
        """
        device = _map_location(map_location)
        f = read_solver_file(path, kind=cls.KIND)  # config derived from the shapes and checked
        solver = cls(f.config["steps"], f.config["order"])
        with torch.no_grad():
            for name in _RAW:
                getattr(solver, name).copy_(f.tensors[name].to(torch.float64))
        solver.metadata = dict(f.info)
        check_samples_finitely(solver, path)
        return solver if device is None else solver.to(device)


def check_samples_finitely(solver, path) -> None:
    """Refuse a loaded solver whose program would not sample: finite raw values can still make coefficients
    or times that overflow float32 (a scale of 1e300), and every sample would be NaN."""
    with torch.no_grad():
        program = solver.program()
    for name in ("coeffs", "times"):
        table = getattr(program, name).to(torch.float32)
        if not bool(torch.isfinite(table).all()):
            raise SolverFileError(f"{os.fspath(path)}: its values give {name} that are not finite in float32 "
                                  f"(largest magnitude {float(getattr(program, name).abs().max()):.3g}); the "
                                  f"solver cannot sample")


def _map_location(map_location) -> Optional[torch.device]:
    if map_location is None:
        return None
    if isinstance(map_location, str):
        try:
            map_location = torch.device(map_location)
        except RuntimeError as exc:
            raise ValueError(f"map_location {map_location!r} is not a device ({exc})") from None
    if isinstance(map_location, torch.device):
        if map_location.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"map_location={str(map_location)!r}, but this torch ({torch.__version__}) sees no "
                             f"CUDA device")
        return map_location
    raise TypeError(f"map_location must be a torch.device, a device string such as 'cuda:0', or None; "
                    f"got {type(map_location).__name__}")
