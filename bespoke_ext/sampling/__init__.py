"""Sampling: ``sample()`` and the executor that runs every solver's program (the only stage loop)."""

from .program import Combine, Eval, Program, ProgramBuilder
from .stats import SampleStats
from .executor import execute
from .cuda_graph import clear_cuda_graphs
from .sample import DEFAULT_METHOD, METHODS, sample

__all__ = [
    "sample", "METHODS", "DEFAULT_METHOD", "SampleStats", "execute", "clear_cuda_graphs",
    "Program", "ProgramBuilder", "Eval", "Combine",
]
