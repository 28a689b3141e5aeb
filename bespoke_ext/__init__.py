"""bespoke_ext: Bespoke solvers for flow and diffusion models.

Learn a few dozen numbers (a re-timing and re-scaling of a model's ODE) and sample in 5-20
model evaluations at the quality plain solvers need more for (midpoint about 1.3-2.4x as many).

    import bespoke_ext as bx
    x1 = bx.sample(model, x0, method="midpoint", nfe=10)          # a baseline, drop-in for flow_matching
    solver = bx.train(model, bx.BespokeSolver(steps=5, order=2), shape=(2,), iterations=300, batch_size=64)
    x1 = bx.sample(model, x0, solver=solver)                      # 10 model evaluations
"""

from . import ops
from .sampling import METHODS, SampleStats, compute_likelihood, sample
from .solvers import BespokeSolver, NonStationarySolver, SolverFileError
from .training import TrainHistory, TrainOptions, train

__version__ = "0.1.0"

__all__ = [
    "ops", "sample", "compute_likelihood", "SampleStats", "METHODS", "BespokeSolver", "NonStationarySolver",
    "SolverFileError",
    "train", "TrainOptions", "TrainHistory", "__version__",
]
