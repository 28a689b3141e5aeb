"""Fixed-step explicit Runge-Kutta methods as Butcher tableaus, compiled to executor programs.

One step t -> t + h of a tableau (c, A, b) with s stages:

    y_j = x + h sum_{l<j} a_jl k_l,     k_j = u(y_j, t + c_j h),     x' = x + h sum_j b_j k_j

Each y_j (j > 0) and x' is one fused combination; zero entries of A and b are left out, so the
arithmetic is that of torchdiffeq's solvers (flow_matching's backend), stage for stage. These are
torchdiffeq's explicit fixed-grid methods, every one of them ("euler", "midpoint", "heun2",
"heun3", "rk4"), with its coefficients (torchdiffeq/_impl/fixed_grid.py, rk_common.py); its other
methods (adaptive, multistep, scipy) run through torchdiffeq itself (sampling/adaptive.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from torch import Tensor

from ..program import Program, ProgramBuilder
from .time_grid import RecordPlan

__all__ = ["Tableau", "TABLEAUS", "METHOD_ALIASES", "canonical_method", "fixed_step_program"]


@dataclass(frozen=True)
class Tableau:
    name: str
    order: int
    c: Tuple[float, ...]
    a: Tuple[Tuple[float, ...], ...]  # row j holds a_j0 .. a_j(j-1)
    b: Tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.c)


TABLEAUS: Dict[str, Tableau] = {
    t.name: t
    for t in (
        Tableau("euler", 1, (0.0,), ((),), (1.0,)),
        Tableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
        # Heun's method (explicit trapezoid); torchdiffeq's "heun2".
        Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
        # Heun's third-order method; torchdiffeq's "heun3" (its tableau, a_31 = b_2 = 0).
        Tableau("heun3", 3, (0.0, 1 / 3, 2 / 3), ((), (1 / 3,), (0.0, 2 / 3)), (1 / 4, 0.0, 3 / 4)),
        # Kutta's 3/8 rule: torchdiffeq's (and so flow_matching's) "rk4".
        Tableau("rk4", 4, (0.0, 1 / 3, 2 / 3, 1.0),
                ((), (1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
                (1 / 8, 3 / 8, 3 / 8, 1 / 8)),
    )
}


METHOD_ALIASES = {"heun2": "heun"}  # torchdiffeq's name of the executor's "heun"


def canonical_method(name: str) -> str:
    """``name`` lower-cased, torchdiffeq's aliases mapped to the package's names ("heun2" -> "heun")."""
    low = name.lower()
    return METHOD_ALIASES.get(low, low)

def fixed_step_program(tableau: Tableau, grid: Tensor, plan: Optional[RecordPlan] = None) -> Program:
    """The program of ``tableau`` over the float64 step grid t_0..t_n (increasing or decreasing).

    ``plan`` (record_plan) adds the intermediates; states alternate between two buffers so both
    ends of a step are available for interpolation.
    """
    ts = [float(v) for v in grid]
    b = ProgramBuilder(tableau.name)
    states = (b.buffer(), b.buffer())
    stage_states = [b.buffer() for _ in range(tableau.stages - 1)]  # one each: a velocity may alias its input
    k = [b.velocity() for _ in range(tableau.stages)]
    x = b.input
    if plan is not None:
        b.record(ts[0], (x,), [1.0])
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        h = t1 - t0
        for j in range(tableau.stages):
            y = x
            if j:
                y = stage_states[j - 1]
                _combine(b, y, x, k, [h * a for a in tableau.a[j]])
            b.eval(k[j], y, t1 if tableau.c[j] == 1.0 else t0 + tableau.c[j] * h)
        out = states[i % 2]
        _combine(b, out, x, k, [h * w for w in tableau.b])
        if plan is not None:
            b.record_step(plan[i], x, out)
        b.end_step()
        x = out
    return b.build(output=x)


def _combine(b: ProgramBuilder, dst: int, x: int, k, weights) -> None:
    """dst = x + sum_l weights[l] k_l over the nonzero weights.

    With two or more velocities the increment is formed first and added to x once, as torchdiffeq does
    (y0 + dt * sum b_l k_l): summed left to right from x, each small term would be rounded at x's
    magnitude, which in float32 gave RK4 3.6x torchdiffeq's rounding error (heun2 1.9x)."""
    used = [(k[l], w) for l, w in enumerate(weights) if w != 0.0]
    if len(used) < 2:
        b.combine(dst, (x, *(s for s, _ in used)), [1.0, *(w for _, w in used)])
        return
    b.combine(dst, tuple(s for s, _ in used), [w for _, w in used])
    b.combine(dst, (x, dst), [1.0, 1.0])
