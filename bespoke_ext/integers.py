"""One reading of "an integer" for every count a user passes (steps, nfe, iterations, shapes, seeds)."""

from __future__ import annotations

import operator
from typing import Optional

__all__ = ["as_int"]


def as_int(value) -> Optional[int]:
    """``value`` as a Python int if it is an integer of any kind (Python, numpy, a 0-dim integer tensor),
    else None. A bool is not a count, and 2.5 is a mistake, not 2 (int() would truncate it)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None
