"""DPM-Solver++(2M) for a flow model on the OT path, as an executor program.

DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Algorithm 2) integrates the probability-flow ODE
of a Gaussian path x_t = alpha_t x1 + sigma_t x0 with a data predictor D. For the OT path
alpha_t = t, sigma_t = 1 - t, and the data prediction of a velocity model is

    D(x, t) = x + (1 - t) u(x, t)                       (x_t = t x1 + (1 - t) x0, u = x1 - x0).

With lambda_t = log(alpha_t / sigma_t) and h_i = lambda_{i+1} - lambda_i, step i (t_i -> t_{i+1}) is

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i + alpha_{i+1} (1 - e^{-h_i}) Dhat_i
    Dhat_0  = D_0                                                   (first step: first order)
    Dhat_i  = (1 + 1 / (2 r_i)) D_i - (1 / (2 r_i)) D_{i-1},  r_i = h_{i-1} / h_i.

alpha_{i+1} (1 - e^{-h_i}) = alpha_{i+1} - alpha_i sigma_{i+1} / sigma_i stays finite at t_0 = 0
(lambda = -inf; the step is then Euler's, and the next step's 1 / (2 r) is 0). A step onto t = 1
(sigma = 0, h = inf) is taken first order, x_n = D_{n-1}, as the reference implementations do with a
final sigma of 0: its second-order correction would need 1 / r = inf.

Every step is linear in (x_i, u_i, x_{i-1}, u_{i-1}): one fused combination of up to four tensors.
"""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from ..program import Program, ProgramBuilder
from .time_grid import RecordPlan

__all__ = ["dpm_solver_program", "DPM_METHOD"]

DPM_METHOD = "dpm++2m"


def _log_snr(t: float) -> float:
    """lambda_t = log(t / (1 - t)) on the OT path, -inf at t = 0 and +inf at t = 1."""
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t) - math.log1p(-t)


def dpm_solver_program(grid: Tensor, plan: Optional[RecordPlan] = None) -> Program:
    """DPM-Solver++(2M) over the increasing float64 grid 0 <= t_0 < ... < t_n <= 1."""
    ts = [float(v) for v in grid]
    if not (0.0 <= ts[0] and ts[-1] <= 1.0 and all(a < b for a, b in zip(ts[:-1], ts[1:]))):
        raise ValueError(f"{DPM_METHOD} needs an increasing time grid inside [0, 1] (noise to data), got {ts}")
    lam = [_log_snr(t) for t in ts]
    b = ProgramBuilder(DPM_METHOD)
    states = (b.buffer(), b.buffer())
    vel = (b.velocity(), b.velocity())  # u_i and u_{i-1} alternate
    x, x_prev = b.input, None
    if plan is not None:
        b.record(ts[0], (x,), [1.0])
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        u, u_prev = vel[i % 2], vel[(i + 1) % 2]
        b.eval(u, x, t0)
        sig0, sig1 = 1.0 - t0, 1.0 - t1
        a = sig1 / sig0
        w = t1 - t0 * a  # alpha_{i+1} (1 - e^{-h_i})
        # 1 / (2 r_i) = h_i / (2 h_{i-1}); 0 after a step from t = 0 (h_{i-1} = inf).
        c = 0.0
        if i > 0 and sig1 > 0.0:
            c = (lam[i + 1] - lam[i]) / (2.0 * (lam[i] - lam[i - 1]))
        out = states[i % 2]
        if c == 0.0:  # x' = a x + w D_i
            b.combine(out, (x, u), [a + w, w * sig0])
        else:  # x' = a x + w ((1 + c) D_i - c D_{i-1})
            sig_prev = 1.0 - ts[i - 1]
            b.combine(out, (x, u, x_prev, u_prev),
                      [a + w * (1.0 + c), w * (1.0 + c) * sig0, -w * c, -w * c * sig_prev])
        if plan is not None:
            b.record_step(plan[i], x, out)
        b.end_step()
        x_prev, x = x, out
    return b.build(output=x)
