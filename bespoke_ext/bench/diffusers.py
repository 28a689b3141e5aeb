"""diffusers' multistep solvers driving this package's velocity fields: the peer code, not a copy.

DPMSolverMultistepScheduler and UniPCMultistepScheduler in their flow-matching mode, as diffusers
documents it (``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``), with every other
setting at diffusers' default (order 2, DPM-Solver++ / UniPC-bh2, lower order in the final steps,
final sigma 0, no shift: ``flow_shift=1`` keeps the grid uniform in time, like our fixed-step solvers).

Conventions, read from diffusers' source (scheduling_dpmsolver_multistep.py, scheduling_unipc_multistep.py):
  - their path is x_sigma = (1 - sigma) x_data + sigma x_noise, sigma from 1 (noise) to 0 (data);
    ours is x_t = t x_data + (1 - t) x_noise (t = 0 noise). So t = 1 - sigma.
  - "flow_prediction" means the model returns x_noise - x_data = dx/dsigma (their data prediction is
    x_data = x - sigma * output). Our velocity is u = dx/dt = -dx/dsigma, so output = -u(x, 1 - sigma).
  - the model's time is taken from ``scheduler.sigmas`` (the float the update itself uses), not from
    ``scheduler.timesteps``: those are sigma * num_train_timesteps cast to int64, which would hand the
    model a time up to 1/1000 off the one the solver assumes.
  - one model evaluation per scheduler step: NFE = num_inference_steps.
  - start: UniPC's grid starts at sigma = 1 - 1e-6; DPM-Solver's at sigma = 1 - 1/num_train_timesteps
    (0.999), i.e. it takes the noise x0 as the state at t = 0.001. That start offset puts a floor under
    its error that no NFE removes (2.5e-3 RMSE on the 64-D oracle, far below its errors at NFE 10-20).
    tests/test_bench.py checks the mapping: UniPC converges to the dopri5 ground truth, DPM-Solver++ to
    the dopri5 solution started at t = 0.001.
diffusers is an optional benchmark dependency: without it these rows are skipped with a note.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Dict, Optional

import torch
from torch import Tensor

__all__ = ["SCHEDULERS", "FLOW_CONFIG", "diffusers_missing", "make_scheduler", "diffusers_sample"]

# method name -> (diffusers class, label in tables)
SCHEDULERS: Dict[str, tuple] = {
    "diffusers-dpm++2m": ("DPMSolverMultistepScheduler", "diffusers DPM-Solver++(2M)"),
    "diffusers-unipc": ("UniPCMultistepScheduler", "diffusers UniPC(bh2)"),
}
FLOW_CONFIG = dict(num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)


def diffusers_missing() -> Optional[str]:
    """None when diffusers is importable, else the note that says why its rows are absent."""
    if importlib.util.find_spec("diffusers") is None:
        return ("diffusers is not installed: its DPMSolverMultistepScheduler / UniPCMultistepScheduler rows are "
                "skipped (pip install diffusers, or the package's `bench` extra)")
    return None


def make_scheduler(method: str):
    """A scheduler of ``method`` (a key of SCHEDULERS) in flow mode; reusable across sampling calls."""
    if method not in SCHEDULERS:
        raise ValueError(f"unknown diffusers method {method!r}; choose one of {sorted(SCHEDULERS)}")
    note = diffusers_missing()
    if note:
        raise ImportError(note)
    import diffusers

    return getattr(diffusers, SCHEDULERS[method][0])(**FLOW_CONFIG)


def _set_steps(scheduler, nfe: int) -> None:
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer (one model evaluation per step), got {nfe!r}")
    scheduler.set_timesteps(nfe)
    scheduler.set_begin_index(0)  # step i is step i, even where int64 timesteps repeat (very high NFE)
    if len(scheduler.timesteps) != nfe:  # would make the NFE column wrong, so never silently
        raise RuntimeError(f"{type(scheduler).__name__} made {len(scheduler.timesteps)} steps for "
                           f"num_inference_steps={nfe}")


def diffusers_sample(method: str, velocity: Callable, x0: Tensor, nfe: int, scheduler=None,
                     **model_extras) -> Tensor:
    """x(1) from x0 by diffusers' ``method`` with ``nfe`` evaluations of ``velocity(x, t)`` (t = 0 noise).

    The loop is the one diffusers' pipelines run: set_timesteps, then scheduler.step after each model
    call, under inference mode like ours; the times handed to the model are prepared before the loop, as
    ours are. ``scheduler``: one from make_scheduler(method), reused across calls as a pipeline reuses
    its own (else a new one per call).
    """
    scheduler = scheduler if scheduler is not None else make_scheduler(method)
    _set_steps(scheduler, nfe)
    times = (1.0 - scheduler.sigmas[:-1]).to(device=x0.device, dtype=x0.dtype).unbind(0)
    x = x0
    with torch.inference_mode():
        for t, timestep in zip(times, scheduler.timesteps, strict=True):
            flow = -velocity(x, t, **model_extras)  # their model output is dx/dsigma = -u
            x = scheduler.step(flow, timestep, x, return_dict=False)[0]
    return x
