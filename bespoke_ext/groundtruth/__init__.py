"""Ground truth for training and validating solvers (method.md §1, §6).

    online_states(model, x0, times)        adaptive dopri5 solve at the given times, re-attached to
                                           the times' graph (x_aux), fresh every call
    TrajectoryCache / build_cache          a fixed set of noise samples solved once on a fine grid,
                                           stored on disk (states and velocities), read back at any
                                           differentiable times by cubic Hermite interpolation
    solve_trajectories                     the batched dopri5 solve both use
"""

from .cache import CacheSpec, TrajectoryCache, build_cache, finalize_cache, shard_noise, shard_rows
from .grid import DEFAULT_GRID_INTERVALS, DEFAULT_GRID_KIND, GRID_KINDS, fine_grid
from .hermite import hermite_coefficients, hermite_interpolate
from .odesolve import DEFAULT_TOL, per_sample_max_rms, solve_trajectories
from .online import online_states, velocities_at

__all__ = [
    "CacheSpec", "TrajectoryCache", "build_cache", "finalize_cache", "shard_noise", "shard_rows",
    "fine_grid", "GRID_KINDS", "DEFAULT_GRID_KIND", "DEFAULT_GRID_INTERVALS",
    "hermite_coefficients", "hermite_interpolate", "DEFAULT_TOL", "per_sample_max_rms", "solve_trajectories",
    "online_states", "velocities_at",
]
