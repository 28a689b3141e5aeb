"""Solvers as programs for the executor: fixed Runge-Kutta tableaus, DPM-Solver++(2M), Bespoke
(learned), and the solver file format. (The adaptive dopri5 path is not a program: sampling/adaptive.py.)"""

from .bespoke import BespokeGrid, BespokeSolver, StepCoefficients
from .nonstationary import NonStationarySolver
from .files import FORMAT_VERSION, SolverFileError, read_solver_file, write_solver_file
from .loading import SOLVER_CLASSES, load_solver
from .preconditioning import preconditioned, preconditioned_grid
from .tableaus import TABLEAUS, Tableau, fixed_step_program
from .dpm_solver import dpm_solver_program

__all__ = [
    "BespokeSolver", "BespokeGrid", "StepCoefficients", "NonStationarySolver",
    "SolverFileError", "FORMAT_VERSION", "SOLVER_CLASSES", "load_solver", "preconditioned", "preconditioned_grid", "read_solver_file", "write_solver_file",
    "Tableau", "TABLEAUS", "fixed_step_program", "dpm_solver_program",
]
