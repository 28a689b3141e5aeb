"""One loader for every solver file: the class is read from the file's own ``kind``."""

from __future__ import annotations

import os
from typing import Union

from .bespoke import BespokeSolver
from .files import SolverFileError
from .nonstationary import NonStationarySolver

__all__ = ["SOLVER_CLASSES", "load_solver"]

SOLVER_CLASSES = {cls.KIND: cls for cls in (BespokeSolver, NonStationarySolver)}


def load_solver(path: Union[str, os.PathLike], map_location=None):
    """The solver saved in ``path`` (a BespokeSolver or a NonStationarySolver, as the file says).

    ``map_location``: where the solver goes, as for ``<Class>.load``: a device or a device string
    ("cuda:0"); None keeps it on the CPU. Every check of ``<Class>.load`` applies; a file of neither
    kind is a SolverFileError naming the file."""
    for cls in SOLVER_CLASSES.values():
        try:
            return cls.load(path, map_location=map_location)
        except SolverFileError as exc:
            if f"not a {cls.KIND!r}" not in str(exc):  # a damaged file, not merely the other kind
                raise
    raise SolverFileError(f"{os.fspath(path)}: holds no solver this bespoke_ext reads (kinds {sorted(SOLVER_CLASSES)})")
