"""Where each training iteration's ground truth comes from: online solves or the trajectory cache.

Both sources draw the GLOBAL batch from one generator (identical on every rank, saved in checkpoints)
and hand this rank its contiguous slice, so one process and N processes see the same samples. With a
conditions pool every sample carries one row of it: online, the rows are drawn with the noise (the
global batch's noise, then its rows, from the same generator); cached, they are the rows stored with
the trajectories. Ranks get the rows of their own samples, so they draw disjoint rows of one batch.

    batch(times)      -> (states [n+1, b, *shape], conditions {name: [b, ...]})   the bound loss's input
    endpoint_batch()  -> (x0, x(1), conditions)                                  the end-to-end loss's
    fit_set(times, M) -> (x0, target(t) = x(t) at any of ``times``, conditions)   the least-squares start's
    states(times) / endpoints()   the same without the conditions
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..groundtruth import TrajectoryCache, online_states, solve_trajectories
from ..groundtruth.inputs import pool_size, take
from .distributed import DistContext, local_slice

__all__ = ["derive_seed", "OnlineBatches", "CachedBatches"]

FitSet = Tuple[Tensor, Callable[[float], Tensor], dict]   # x0, target(t) = x(t), conditions


def derive_seed(seed: int, stream: str) -> int:
    """An independent 63-bit seed for a named random stream ("batches", "validation", ...)."""
    digest = hashlib.sha256(f"bespoke_ext:{int(seed)}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


class _Batches:
    def __init__(self, batch_size: int, generator: torch.Generator, ctx: DistContext):
        self.batch_size, self.generator, self.ctx = batch_size, generator, ctx
        self.lo, self.hi = local_slice(batch_size, ctx.rank, ctx.world_size)
        self.gt_seconds = 0.0  # wall-clock spent producing ground truth (solves, reads, interpolation)

    @property
    def local_size(self) -> int:
        return self.hi - self.lo

    def states(self, times: Tensor) -> Tensor:
        return self.batch(times)[0]

    def endpoints(self) -> Tuple[Tensor, Tensor]:
        return self.endpoint_batch()[:2]


class OnlineBatches(_Batches):
    """The paper's ground truth: fresh x0 ~ N(0, I) every iteration, solved at the current times."""

    def __init__(self, model: Callable, shape: Sequence[int], *, batch_size: int, generator: torch.Generator,
                 ctx: DistContext, dtype: torch.dtype, device: torch.device, rtol: float, atol: float,
                 group_size: int, chunk_size: int, extras: dict, conditions: Optional[dict] = None):
        if batch_size < ctx.world_size:  # every rank refuses alike, so no rank waits for another
            raise ValueError(f"gt='online' with batch_size={batch_size} on {ctx.world_size} processes leaves a "
                             f"rank without samples to solve: use batch_size >= {ctx.world_size} or gt='cached'")
        super().__init__(batch_size, generator, ctx)
        self.model, self.shape, self.dtype, self.device = model, tuple(shape), dtype, device
        self.conditions = conditions
        self.solve_kw = dict(rtol=rtol, atol=atol, model_extras=extras, group_size=group_size)
        self.chunk_size = chunk_size
        self.stats = {"nfe": 0}

    def _noise(self, size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tuple[Tensor, dict]:
        # Drawn on the CPU for the whole global batch, so every rank advances the generator alike:
        # the noise, then (with conditions) one row of the pool per sample.
        size, generator = size or self.batch_size, generator or self.generator
        lo, hi = local_slice(size, self.ctx.rank, self.ctx.world_size)
        x0 = torch.randn(size, *self.shape, generator=generator, dtype=self.dtype)
        rows = None
        if self.conditions:
            rows = torch.randint(pool_size(self.conditions), (size,), generator=generator)[lo:hi]
        return x0[lo:hi].to(self.device), take(self.conditions, rows, device=self.device)

    def batch(self, times: Tensor) -> Tuple[Tensor, dict]:
        x0, cond = self._noise()
        start = time.perf_counter()
        out = online_states(self.model, x0, times, chunk_size=self.chunk_size, stats=self.stats, conditions=cond,
                            **self.solve_kw)
        self.gt_seconds += time.perf_counter() - start
        return out, cond

    def endpoint_batch(self) -> Tuple[Tensor, Tensor, dict]:
        x0, cond = self._noise()
        start = time.perf_counter()
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        x1 = solve_trajectories(self.model, x0, ends, stats=self.stats, conditions=cond, **self.solve_kw)[-1]
        self.gt_seconds += time.perf_counter() - start
        return x0, x1, cond

    def fit_set(self, times: Tensor, size: int, generator: torch.Generator) -> FitSet:
        """``size`` fresh noise samples (from ``generator``, not the batches' stream), solved once at every
        time in ``times`` (the union of the grids the fit may try); target(t) looks t up."""
        x0, cond = self._noise(size, generator)
        start = time.perf_counter()
        grid = torch.unique(times.detach().double().cpu())           # sorted
        states = solve_trajectories(self.model, x0, grid, stats=self.stats, conditions=cond, **self.solve_kw)
        self.gt_seconds += time.perf_counter() - start

        def target(t: float) -> Tensor:   # the solved time nearest t (the solver's times are the grids' to ~1e-16)
            k = int(torch.argmin((grid - t).abs()))
            if abs(float(grid[k]) - t) > 1e-9:
                raise ValueError(f"the fit asked for ground truth at t = {t!r}, which was not solved")
            return states[k]

        return x0, target, cond


class CachedBatches(_Batches):
    """Batches of trajectories from a cache, read at any times by Hermite interpolation; with ``conditions``
    (the pool the cache was solved with) each sample's condition is the pool's row stored with it."""

    def __init__(self, cache: TrajectoryCache, *, batch_size: int, generator: torch.Generator, ctx: DistContext,
                 conditions: Optional[dict] = None):
        super().__init__(batch_size, generator, ctx)
        if pool_size(conditions) != cache.spec.condition_rows:
            raise ValueError(f"the conditions pool has {pool_size(conditions)} rows, the trajectory cache was solved "
                             f"for a pool of {cache.spec.condition_rows}")
        self.conditions = conditions
        if batch_size > cache.num_samples:
            raise ValueError(f"batch_size ({batch_size}) exceeds the trajectory cache's {cache.num_samples} samples; "
                             f"raise cache_samples or lower batch_size")
        self.cache = cache

    def _indices(self) -> Tensor:
        # A random subset without repetition inside the batch; every rank draws the same permutation.
        idx = torch.randperm(self.cache.num_samples, generator=self.generator)[:self.batch_size]
        return idx[self.lo:self.hi]

    def _cond(self, idx: Tensor) -> dict:
        return take(self.conditions, self.cache.rows(idx), device=self.cache.device)

    def batch(self, times: Tensor) -> Tuple[Tensor, dict]:
        idx = self._indices()
        start = time.perf_counter()
        out = self.cache.states(idx, times)
        cond = self._cond(idx)
        self.gt_seconds += time.perf_counter() - start
        return out, cond

    def endpoint_batch(self) -> Tuple[Tensor, Tensor, dict]:
        idx = self._indices()
        return (*self.cache.endpoints(idx), self._cond(idx))

    def fit_set(self, times: Tensor, size: int, generator: torch.Generator) -> FitSet:
        """The cache's first ``size`` trajectories (all, if it holds fewer); target(t) reads them at any t."""
        m = min(size, self.cache.num_samples)
        lo, hi = local_slice(m, self.ctx.rank, self.ctx.world_size)
        idx = torch.arange(lo, hi)

        def target(t: float) -> Tensor:
            start = time.perf_counter()
            out = self.cache.states(idx, torch.tensor([t], dtype=torch.float64))[0]
            self.gt_seconds += time.perf_counter() - start
            return out

        return self.cache.noise(idx), target, self._cond(idx)
