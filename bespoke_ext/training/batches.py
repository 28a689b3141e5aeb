"""Where each training iteration's ground truth comes from: online solves or the trajectory cache.

Both sources draw the GLOBAL batch from one generator (identical on every rank, saved in checkpoints)
and hand this rank its contiguous slice, so one process and N processes see the same samples.

    states(times) -> [n+1, b, *shape]   ground truth at the solver's times, differentiable in them
    endpoints()   -> (x0, x(1))          pairs for the end-to-end loss
"""

from __future__ import annotations

import hashlib
import time
from typing import Callable, Sequence, Tuple

import torch
from torch import Tensor

from ..groundtruth import TrajectoryCache, online_states, solve_trajectories
from .distributed import DistContext, local_slice

__all__ = ["derive_seed", "OnlineBatches", "CachedBatches"]


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


class OnlineBatches(_Batches):
    """The paper's ground truth: fresh x0 ~ N(0, I) every iteration, solved at the current times."""

    def __init__(self, model: Callable, shape: Sequence[int], *, batch_size: int, generator: torch.Generator,
                 ctx: DistContext, dtype: torch.dtype, device: torch.device, rtol: float, atol: float,
                 group_size: int, chunk_size: int, extras: dict):
        super().__init__(batch_size, generator, ctx)
        self.model, self.shape, self.dtype, self.device = model, tuple(shape), dtype, device
        self.solve_kw = dict(rtol=rtol, atol=atol, model_extras=extras, group_size=group_size)
        self.chunk_size = chunk_size
        self.stats = {"nfe": 0}

    def _noise(self) -> Tensor:
        # Drawn on the CPU for the whole global batch, so every rank advances the generator alike.
        x0 = torch.randn(self.batch_size, *self.shape, generator=self.generator, dtype=self.dtype)
        return x0[self.lo:self.hi].to(self.device)

    def states(self, times: Tensor) -> Tensor:
        x0 = self._noise()
        start = time.perf_counter()
        out = online_states(self.model, x0, times, chunk_size=self.chunk_size, stats=self.stats, **self.solve_kw)
        self.gt_seconds += time.perf_counter() - start
        return out

    def endpoints(self) -> Tuple[Tensor, Tensor]:
        x0 = self._noise()
        start = time.perf_counter()
        ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
        x1 = solve_trajectories(self.model, x0, ends, stats=self.stats, **self.solve_kw)[-1]
        self.gt_seconds += time.perf_counter() - start
        return x0, x1


class CachedBatches(_Batches):
    """Batches of trajectories from a cache, read at any times by Hermite interpolation."""

    def __init__(self, cache: TrajectoryCache, *, batch_size: int, generator: torch.Generator, ctx: DistContext):
        super().__init__(batch_size, generator, ctx)
        if batch_size > cache.num_samples:
            raise ValueError(f"batch_size ({batch_size}) exceeds the trajectory cache's {cache.num_samples} samples; "
                             f"raise cache_samples or lower batch_size")
        self.cache = cache

    def _indices(self) -> Tensor:
        # A random subset without repetition inside the batch; every rank draws the same permutation.
        idx = torch.randperm(self.cache.num_samples, generator=self.generator)[:self.batch_size]
        return idx[self.lo:self.hi]

    def states(self, times: Tensor) -> Tensor:
        idx = self._indices()
        start = time.perf_counter()
        out = self.cache.states(idx, times)
        self.gt_seconds += time.perf_counter() - start
        return out

    def endpoints(self) -> Tuple[Tensor, Tensor]:
        return self.cache.endpoints(self._indices())
