"""Sampling: ``sample()`` and the executor that runs every solver's program (the only stage loop)."""

from .stats import SampleStats
from .executor import execute
from .adaptive import ADAPTIVE_METHODS, solve_adaptive
from .cuda_graph import clear_cuda_graphs
from .sample import DEFAULT_METHOD, METHODS, sample
from .likelihood import compute_likelihood

__all__ = [
    "sample", "METHODS", "DEFAULT_METHOD", "SampleStats", "execute", "clear_cuda_graphs", "solve_adaptive", "ADAPTIVE_METHODS",
    "compute_likelihood",
]
