"""Noise-scale preconditioning of a non-stationary solver (method.md §9, the BNS paper's Eq. 14).

For guided models the paper scales the source noise: the path x_t = t x_1 + (1 - t) x_0 becomes
x̄_r = r x_1 + sigma_0 (1 - r) x_0, a scale-time change of the same ODE (method.md §2) with

    t(r) = r / (r + sigma_0 (1 - r)),        s(r) = r + sigma_0 (1 - r)        (x̄_r = s(r) x_{t(r)}),

undone at the end (s(1) = 1). Euler with uniform steps in r, written back in the model's x:

    x_{i+1} = x_i + h s_i t'(r_i) / s_{i+1} U_i,   t'(r) = sigma_0 / s(r)^2,   so the step is
    h sigma_0 / (s_i s_{i+1}) = t(r_{i+1}) - t(r_i)      (s is linear: s_i + h s' = s_{i+1}),

which is exactly Euler on the warped grid t_i = t(r_i): sigma_0 > 1 packs the steps near the noise end.
As a start for a non-stationary solver it is a member like any other (``from_solver``), and the solver
then learns from there. This holds for models on the OT / rectified-flow path (flow matching, Flux,
SD3); on another path the same grid is only a heuristic start.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .nonstationary import NonStationarySolver, _check_nfe
from .tableaus import TABLEAUS, fixed_step_program

__all__ = ["preconditioned_grid", "preconditioned"]


def preconditioned_grid(nfe: int, sigma0: float) -> Tensor:
    """t(r_i) for r_i = i / nfe (float64, t_0 = 0, t_n = 1 exactly): the grid of Euler on the path whose
    source noise is scaled by ``sigma0`` (sigma0 = 1: the uniform grid)."""
    nfe = _check_nfe(nfe)
    if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not math.isfinite(sigma0) or sigma0 <= 0:
        raise ValueError(f"sigma0 (the source-noise scale) must be a finite number > 0, got {sigma0!r}")
    r = torch.arange(nfe + 1, dtype=torch.float64) / nfe
    t = r / (r + sigma0 * (1 - r))
    t[0], t[-1] = 0.0, 1.0
    return t


def preconditioned(nfe: int, sigma0: float, **scales) -> NonStationarySolver:
    """A fresh NonStationarySolver that is Euler on the sigma0-preconditioned path (the paper used sigma0 = 5
    at guidance 2 and 10 at guidance 6.5); ``scales``: time_scale, coeff_scale as in NonStationarySolver."""
    program = fixed_step_program(TABLEAUS["euler"], preconditioned_grid(nfe, sigma0))
    solver = NonStationarySolver.from_solver(program, **scales)
    solver.metadata["initialised_from"] = f"euler, noise preconditioned by sigma0 = {float(sigma0):g}"
    return solver
