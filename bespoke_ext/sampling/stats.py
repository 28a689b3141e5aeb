"""What a sampling call cost: model evaluations and network forwards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["SampleStats", "ForwardCounter"]


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
        value = getattr(self._model, "network_forwards", None)
        return value if isinstance(value, int) else None

    def after_first_eval(self) -> None:
        after = self._read()
        if self._before is not None and after is not None:
            self.per_eval = max(after - self._before, 0)
