"""Validation: held-out noise, its ground truth x(1), and the solver's error against it (method.md §1).

    RMSE = mean over samples of || x_n - x(1) ||          (|| . || the per-sample RMS)
    PSNR = mean over samples of 10 log10(4 / MSE_b)        (data in [-1, 1]; MSE_b = || x_n - x(1) ||^2)

The noise comes from its own random stream, so validation never overlaps training batches or the cache.
The solver runs as users sample with it: ``solver.program()`` through the executor's inference path,
exactly ``bespoke_ext.sample(model, x0, solver=solver)`` (float32 coefficients for float32 states, a
0-dim time per evaluation), so keep-best selects by the numbers users will get. The formulas are the
package's one RMSE/PSNR (``bespoke_ext.metrics.errors``: per_sample_rms, psnr_from_rms).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..groundtruth import solve_trajectories
from ..groundtruth.inputs import pool_size, rows_of, take
from ..groundtruth.validation_store import load_solved, store_solved
from ..metrics.errors import psnr_from_rms
from .distributed import DistContext, local_slice
from .loss import final_errors, solver_program

__all__ = ["ValidationSet"]


class ValidationSet:
    """x0 [V, *shape] and x(1) [V, *shape], solved once (ranks split the solve by groups).

    Args: model, shape, size V, seed (of the validation stream), dtype, device, tolerances, group size,
    model extras, ctx (distributed context), progress bar flag, conditions (the pool {name: Tensor [M, ...]}:
    every validation sample draws its own row from the validation stream, after its noise; ``rows`` [V]
    and ``cond`` {name: Tensor [V, ...]} hold them), solved (x(1) of this very set, from a checkpoint of
    the same run: a resume does not solve it again), store (a trajectory cache's folder: x(1) is read from
    it when a run on the same cache solved this very set, else solved and kept there,
    groundtruth/validation_store.py). ``seconds``: the wall-clock of that solve or read (ground-truth work).
    """

    def __init__(self, model: Callable, shape: Sequence[int], *, size: int, seed: int, dtype: torch.dtype,
                 device: torch.device, rtol: float, atol: float, group_size: int, extras: dict,
                 ctx: DistContext, progress: bool = False, conditions: Optional[dict] = None,
                 solved: Optional[Tensor] = None, store: Optional[Path] = None):
        from tqdm.auto import tqdm

        started = time.perf_counter()
        self.ctx = ctx
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(size, *shape, generator=g, dtype=dtype).to(device)
        self.rows = torch.randint(pool_size(conditions), (size,), generator=g) if conditions else None
        self.cond = take(conditions, self.rows, device=device)
        self.lo, self.hi = local_slice(size, ctx.rank, ctx.world_size)
        self.seconds = 0.0
        if solved is not None and solved.shape == self.x0.shape:
            self.x1 = solved.to(device=device, dtype=dtype)
            return
        key = {"size": size, "seed": seed, "group_size": group_size}
        if store is not None:
            stored = load_solved(store, key, self.x0)
            # every rank must take the same path (the solve below ends in a collective)
            found = ctx.all_reduce_sum_(torch.tensor([float(stored is not None)], device=device))
            if int(found.item()) == ctx.world_size:
                self.x1 = stored
                self.seconds = time.perf_counter() - started
                return
        x1 = torch.zeros_like(self.x0)
        groups = range(0, size, group_size)
        mine = [a for j, a in enumerate(groups) if j % ctx.world_size == ctx.rank]
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        with tqdm(total=sum(min(group_size, size - a) for a in mine), desc="validation ground truth", unit="traj",
                  disable=not progress, leave=False) as bar:
            for a in mine:
                x1[a:a + group_size] = solve_trajectories(model, self.x0[a:a + group_size], ends, rtol=rtol, atol=atol,
                                                          model_extras=extras, group_size=group_size, progress=bar,
                                                          conditions=rows_of(self.cond, slice(a, a + group_size)))[-1]
        self.x1 = ctx.all_reduce_sum_(x1)  # each sample is non-zero on exactly one rank
        if store is not None and ctx.is_main:
            store_solved(store, key, self.x0, self.x1)
        self.seconds = time.perf_counter() - started

    def __len__(self) -> int:
        return self.x0.shape[0]

    @torch.no_grad()
    def per_sample_errors(self, model: Callable, solver, *, extras: dict, chunk_size: int,
                          lo: int = 0, hi: Optional[int] = None) -> Tensor:
        """|| x_n - x(1) || [hi - lo] (float64) for samples [lo, hi), the solver (or its Program) run by
        the executor in chunks of ``chunk_size`` samples, as ``bespoke_ext.sample`` runs it."""
        hi = len(self) if hi is None else hi
        program = solver_program(solver, differentiable=False)
        parts = [final_errors(model, program, self.x0[a:min(a + chunk_size, hi)], self.x1[a:min(a + chunk_size, hi)],
                              extras=extras, enable_grad=False,
                              conditions=rows_of(self.cond, slice(a, min(a + chunk_size, hi))))
                 for a in range(lo, hi, chunk_size)]
        return torch.cat(parts) if parts else self.x0.new_zeros(0, dtype=torch.float64)

    def evaluate(self, model: Callable, solver, *, extras: dict, chunk_size: int) -> Tuple[float, float]:
        """(RMSE, PSNR) over the whole set; ranks evaluate their slices and sum (all get the same numbers)."""
        err = self.per_sample_errors(model, solver, extras=extras, chunk_size=chunk_size, lo=self.lo, hi=self.hi)
        # PSNR capped at an MSE of 1e-30 (346 dB): an exact sample must not make the mean infinite.
        sums = torch.stack([err.sum(), psnr_from_rms(err.clamp_min(1e-15), data_range=2.0).sum()])
        sums = self.ctx.all_reduce_sum_(sums)
        return float(sums[0]) / len(self), float(sums[1]) / len(self)
