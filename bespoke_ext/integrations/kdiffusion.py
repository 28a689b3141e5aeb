"""Bespoke solvers as k-diffusion-convention samplers (the function form ComfyUI's KSAMPLER takes).

    sample_bespoke(model, x, sigmas, extra_args=None, callback=None, disable=None, solver=solver)

k-diffusion's convention (k_diffusion/sampling.py): ``model(x, sigma * s_in, **extra_args)`` is a
*denoiser* D, the data estimate, and samplers step x from sigmas[0] to sigmas[-1] = 0. For a flow model in
ComfyUI (``model_sampling`` CONST: Flux, SD3, Wan, ...) the path is x = sigma * noise + (1 - sigma) * data
and D = x - sigma * (noise - data), so with t = 1 - sigma the velocity is

    u(x, t) = dx/dt = (D(x, 1 - t) - x) / (1 - t)          (= -k-diffusion's to_d(x, sigma, D))

which is finite wherever the solvers evaluate (t < 1). The solver then runs its own program (the one
``bespoke_ext.sample`` runs) on u. ``sigmas`` must be the solver's grid, ``solver_sigmas(solver)``
(1 - t_0, ..., 1 - t_{n-1}, 0), or a contiguous part of it: a suffix (denoise < 1, the low-noise half
of ComfyUI's SplitSigmas; a BespokeSolver resumes at any step, a NonStationarySolver only from the
start) or a prefix (the high-noise half, for a second model or sampler to finish: the solver stops at
the last sigma and returns its state there, x at that noise level, as k-diffusion's samplers do). Sigmas above 1 belong to diffusion (VE /
VP) models: an error, as is a ComfyUI model whose model_sampling is not CONST.

The callback gets k-diffusion's dict {'x', 'i', 'sigma', 'sigma_hat', 'denoised'} once per solver step
(at the step's first evaluation), i counting the steps of ``sigmas``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import trange

from ..solvers import BespokeSolver, NonStationarySolver
from .stepping import ProgramStepper, state_dtype

__all__ = ["sample_bespoke", "solver_sigmas", "flow_velocity", "check_flow_model"]

_SIGMA_ATOL = 1e-5


def solver_sigmas(solver, device=None) -> Tensor:
    """The solver's grid as k-diffusion sigmas, float32: [1 - t_0, ..., 1 - t_{n-1}, 0]."""
    return (1.0 - solver.times().detach().to(torch.float64).cpu()).to(torch.float32).to(device)


def flow_velocity(denoiser: Callable, **extra_args) -> Callable:
    """A velocity model u(x, t) = (D(x, 1 - t) - x) / (1 - t) from a k-diffusion flow denoiser D(x, sigma)."""
    def velocity(x: Tensor, t: Tensor, **extras) -> Tensor:
        # t: 0-dim (sampling) or one time per sample [B] (bx.train's bound loss)
        sigma = (1.0 - torch.as_tensor(t, dtype=x.dtype, device=x.device)).expand(x.shape[0])
        denoised = denoiser(x, sigma, **extra_args, **extras)
        return (denoised - x) / sigma.reshape(-1, *([1] * (x.dim() - 1)))
    return velocity


def _model_sampling(model, depth: int = 4):
    """ComfyUI's model_sampling object, looked up through the wrappers' inner_model / model attributes."""
    layer = [model]
    for _ in range(depth):
        nxt = []
        for obj in layer:
            ms = getattr(obj, "model_sampling", None)
            if ms is not None:
                return ms
            nxt += [o for o in (getattr(obj, "inner_model", None), getattr(obj, "model", None)) if o is not None]
        layer = nxt
    return None


def check_flow_model(model) -> None:
    """ValueError when ``model`` is a ComfyUI model whose model_sampling is not CONST (not a flow model):
    the same test ComfyUI's rectified-flow samplers make. Models without model_sampling pass."""
    ms = _model_sampling(model)
    if ms is not None and not any(c.__name__ == "CONST" for c in type(ms).__mro__):
        raise ValueError(f"sample_bespoke samples flow models (ComfyUI model_sampling CONST: Flux, SD3, ...); this "
                         f"model's model_sampling is {type(ms).__name__}, a diffusion parametrisation")


def _check_sigmas(sig: Tensor) -> None:
    if sig.dim() != 1 or sig.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels, got shape {tuple(sig.shape)}")
    if not bool(torch.isfinite(sig).all()):
        raise ValueError("sigmas must be finite")
    top = float(sig.max())
    if top > 1.0 + _SIGMA_ATOL or float(sig.min()) < 0.0:
        raise ValueError(f"sigmas span [{float(sig.min()):.4g}, {top:.4g}]: not a flow model's noise levels, which "
                         f"run from 1 (noise) to 0 (data). sample_bespoke is for flow models (ComfyUI CONST model "
                         f"sampling); sigma_max > 1 means a diffusion (VE / VP, eps / v) model")


def resume_point(solver, start: int, remedy: str) -> Tuple[ProgramStepper, int]:
    """(the solver's stepper, its first evaluation) for sampling from step ``start`` on; a ValueError ending
    in ``remedy`` where the solver cannot start there (a NonStationarySolver reads earlier states)."""
    with torch.no_grad():
        stepper = ProgramStepper(solver.program())
    first = start * (stepper.nfe // solver.steps)
    if not stepper.startable(first):
        raise ValueError(f"{type(solver).__name__} cannot resume at step {start} of {solver.steps} (it reads earlier "
                         f"states): {remedy}")
    return stepper, first


def sample_bespoke(model: Callable, x: Tensor, sigmas: Tensor, extra_args: Optional[dict] = None,
                   callback: Optional[Callable] = None, disable: Optional[bool] = None, solver=None) -> Tensor:
    """Sample with ``solver`` from x at sigmas[0] to sigmas[-1] = 0 (module docstring)."""
    if solver is None or not isinstance(solver, (BespokeSolver, NonStationarySolver)):
        got = "" if solver is None else f", got {type(solver).__name__} (a file? bespoke_ext.load_solver(path))"
        raise TypeError(f"sample_bespoke needs solver=: a BespokeSolver or NonStationarySolver "
                        f"(ComfyUI: KSAMPLER(sample_bespoke, {{'solver': solver}})){got}")
    extra_args = {} if extra_args is None else extra_args
    check_flow_model(model)
    sig = torch.as_tensor(sigmas).detach().to(device="cpu", dtype=torch.float64)
    _check_sigmas(sig)
    grid = solver_sigmas(solver).to(torch.float64)
    steps = sig.numel() - 1
    # the run of the grid's step boundaries that sigmas are (the grid decreases strictly: at most one fits)
    start = next((i for i in range(solver.steps - steps + 1)
                  if torch.allclose(sig, grid[i:i + steps + 1], atol=_SIGMA_ATOL, rtol=0)), None)
    if start is None:
        shown = [round(v, 5) for v in grid.tolist()]
        raise ValueError(f"sigmas {[round(v, 5) for v in sig.tolist()]} are not this solver's grid {shown} or a "
                         f"contiguous part of it; use solver_sigmas(solver) (ComfyUI: the BespokeSigmas node)")
    stepper, first = resume_point(solver, start, "pass its whole grid, solver_sigmas(solver)")
    per_step = stepper.nfe // solver.steps
    last = (start + steps) * per_step   # a run ending above 0 stops at its last step boundary
    levels = (1.0 - stepper.eval_times).tolist()  # the sigma of every evaluation
    dtype = state_dtype(x.dtype)
    s_in = x.new_ones([x.shape[0]])
    state = x.to(dtype)
    with torch.no_grad():
        for k in trange(first, last, disable=disable):
            sigma = levels[k]
            x_in = state.to(x.dtype)
            denoised = model(x_in, sigma * s_in, **extra_args)
            u = (denoised.to(dtype) - state) / sigma
            if callback is not None and k % per_step == 0:
                i = k // per_step - start
                callback({"x": x_in, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
            state = stepper.step(k, u, state)
    return state.to(x.dtype)
