"""Training Bespoke solvers (method.md §5-6): losses, the trainer, checkpoints, torch.distributed glue.

    train(model, solver, *, shape, iterations, batch_size, seed=0, conditions=None, **options) -> solver
        (options: TrainOptions; the run's record: solver.history, a TrainHistory)
    bound_loss / end_to_end_loss / solver_table / solver_program / lipschitz_weights   the losses, for reuse
"""

from .history import TrainHistory, plot_history
from .loss import (SolverTable, bound_loss, end_to_end_loss, final_errors, lipschitz_weights, local_errors,
                   solver_program, solver_table)
from .options import TrainOptions
from .probe import probe_model
from .trainer import NonFiniteTrainingError, default_cache_root, train
from .validation import ValidationSet

__all__ = [
    "train", "TrainOptions", "TrainHistory", "plot_history", "default_cache_root", "NonFiniteTrainingError", "probe_model",
    "SolverTable", "solver_table", "bound_loss", "end_to_end_loss", "lipschitz_weights", "local_errors",
    "final_errors", "solver_program", "ValidationSet",
]
