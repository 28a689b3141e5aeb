"""``bespoke-ext demo``: the whole method on an embedded model, against the solvers a user would pick.

    presets    the settings per embedded model (evaluation batch, training budget, NFE sweeps)
    run        the stages (load, ground truth, train, evaluate, report) and ``run()``, the demo as a function
"""

from .presets import DEMO_PRESETS, Preset, check_nfes, settings
from .run import FAMILIES, LOOSE_TOL, baseline_runs, row_order, run, solver_file_name, train_solvers

__all__ = ["run", "DEMO_PRESETS", "Preset", "settings", "check_nfes", "train_solvers", "baseline_runs",
           "solver_file_name", "row_order", "LOOSE_TOL", "FAMILIES"]
