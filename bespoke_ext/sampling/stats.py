"""What a sampling call cost: model evaluations and network forwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

__all__ = ["SampleStats", "ForwardCounter", "network_forwards_of"]


@dataclass(frozen=True)
class SampleStats:
    """Cost of one ``sample`` call, per sample of the batch.

    nfe: model evaluations (a guided evaluation counts once).
    network_forwards: network forwards (a classifier-free-guided evaluation runs the network twice).
    steps: solver steps of a fixed-step solver; None for adaptive methods (see nfe).
    method: the solver that ran.
    """

    nfe: int
    network_forwards: int
    steps: Optional[int]
    method: str


class ForwardCounter:
    """Network forwards per model evaluation, read from the model's own counter.

    Models that run the network more than once per evaluation (classifier-free guidance) keep an
    integer ``network_forwards`` attribute; the change over one evaluation is the count per
    evaluation. Other models count one. Measured once per call (on the first evaluation), so it
    also holds when later evaluations are replayed from a CUDA graph without running Python.
    """

    def __init__(self, model):
        self._model = model
        self._before = self._read()
        self.per_eval = 1

    def _read(self):
        value = network_forwards_of(self._model)
        return value if isinstance(value, int) else None

    def after_first_eval(self) -> None:
        after = self._read()
        if self._before is not None and after is not None:
            self.per_eval = max(after - self._before, 0)


def network_forwards_of(model):
    """The model's ``network_forwards`` attribute, or None.

    Where nn.Module.__getattr__ would decide, decide without it: for a module that lacks the
    attribute it formats and raises an AttributeError, twice a sampling call (about 5 us with cold
    caches). Counters kept as properties, in the instance or behind a custom ``__getattr__`` are read.
    """
    if (getattr(type(model), "__getattr__", None) is nn.Module.__getattr__
            and "network_forwards" not in model.__dict__ and not hasattr(type(model), "network_forwards")):
        return None
    return getattr(model, "network_forwards", None)
