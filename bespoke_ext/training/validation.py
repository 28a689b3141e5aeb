"""Validation: held-out noise, its ground truth x(1), and the solver's error against it (method.md §1).

    RMSE = mean over samples of || x_n - x(1) ||          (|| . || the per-sample RMS)
    PSNR = mean over samples of 10 log10(4 / MSE_b)        (data in [-1, 1]; MSE_b = || x_n - x(1) ||^2)

The noise comes from its own random stream, so validation never overlaps training batches or the cache.
The solver is run with exactly the coefficients the loss trains (the same table, ``rollout``).
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

from ..groundtruth import solve_trajectories
from .distributed import DistContext, local_slice
from .loss import SolverTable, rollout

__all__ = ["ValidationSet", "rmse_psnr"]


def rmse_psnr(per_sample_rms: Tensor) -> Tuple[float, float]:
    """(RMSE, PSNR in dB) from per-sample RMS errors."""
    mse = per_sample_rms.double().pow(2).clamp_min(1e-30)
    return float(per_sample_rms.double().mean()), float((10.0 * torch.log10(4.0 / mse)).mean())


class ValidationSet:
    """x0 [V, *shape] and x(1) [V, *shape], solved once (ranks split the solve by groups).

    Args: model, shape, size V, seed (of the validation stream), dtype, device, tolerances, group size,
    model extras, ctx (distributed context), progress bar flag.
    """

    def __init__(self, model: Callable, shape: Sequence[int], *, size: int, seed: int, dtype: torch.dtype,
                 device: torch.device, rtol: float, atol: float, group_size: int, extras: dict,
                 ctx: DistContext, progress: bool = False):
        from tqdm.auto import tqdm

        self.ctx = ctx
        g = torch.Generator().manual_seed(seed)
        self.x0 = torch.randn(size, *shape, generator=g, dtype=dtype).to(device)
        x1 = torch.zeros_like(self.x0)
        groups = range(0, size, group_size)
        mine = [a for j, a in enumerate(groups) if j % ctx.world_size == ctx.rank]
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        with tqdm(total=sum(min(group_size, size - a) for a in mine), desc="validation ground truth", unit="traj",
                  disable=not progress, leave=False) as bar:
            for a in mine:
                x1[a:a + group_size] = solve_trajectories(model, self.x0[a:a + group_size], ends, rtol=rtol, atol=atol,
                                                          model_extras=extras, group_size=group_size, progress=bar)[-1]
        self.x1 = ctx.all_reduce_sum_(x1)  # each sample is non-zero on exactly one rank
        self.lo, self.hi = local_slice(size, ctx.rank, ctx.world_size)

    def __len__(self) -> int:
        return self.x0.shape[0]

    @torch.no_grad()
    def per_sample_errors(self, model: Callable, table: SolverTable, *, extras: dict, chunk_size: int,
                          lo: int = 0, hi: int = None) -> Tensor:
        """|| x_n - x(1) || for samples [lo, hi) (the solver run in chunks of ``chunk_size`` samples)."""
        hi = len(self) if hi is None else hi
        table = SolverTable(**{k: v.detach() for k, v in table.named().items()})
        parts = [rollout(model, table, self.x0[a:min(a + chunk_size, hi)], extras=extras,
                         target=self.x1[a:min(a + chunk_size, hi)]) for a in range(lo, hi, chunk_size)]
        return torch.cat(parts) if parts else self.x0.new_zeros(0)

    def evaluate(self, model: Callable, table: SolverTable, *, extras: dict, chunk_size: int) -> Tuple[float, float]:
        """(RMSE, PSNR) over the whole set; ranks evaluate their slices and sum (all get the same numbers)."""
        err = self.per_sample_errors(model, table, extras=extras, chunk_size=chunk_size, lo=self.lo, hi=self.hi)
        mse = err.double().pow(2).clamp_min(1e-30)
        sums = torch.stack([err.double().sum(), (10.0 * torch.log10(4.0 / mse)).sum()])
        sums = self.ctx.all_reduce_sum_(sums)
        return float(sums[0]) / len(self), float(sums[1]) / len(self)
