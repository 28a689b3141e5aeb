"""The executor's input: a flat, static program of model evaluations and linear combinations.

Every solver in the package (fixed Runge-Kutta tableaus, DPM-Solver++, Bespoke) is written as such a
program over numbered *slots*, each holding one tensor of the state's shape:

    Eval(dst, src, time)       slots[dst] = model(slots[src], times[time], **extras)
    Combine(dst, srcs, coeffs) slots[dst] = sum_j coeffs[j] * slots[srcs[j]]     (one fused op)

Slot 0 is the input x0 (read, never written). *Buffer* slots get one preallocated tensor per call;
*velocity* slots are rebound to the model's outputs (no copy); *record* slots are the rows of the
stacked intermediates tensor. The times and coefficients live in two float64 tables (one entry per
Eval, one row per Combine), so a program's structure never depends on their values: retraining a
solver changes the tables, not the instructions, and the tables may carry autograd history.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["Eval", "Combine", "Program", "ProgramBuilder"]

@dataclass(frozen=True)
class Eval:
    """slots[dst] = model(slots[src], times[time])."""

    dst: int
    src: int
    time: int


@dataclass(frozen=True)
class Combine:
    """slots[dst] = sum_j coeffs[start + j] * slots[srcs[j]]."""

    dst: int
    srcs: Tuple[int, ...]
    start: int  # offset of this combination's coefficients in the flat coefficient table


@dataclass(frozen=True)
class Program:
    """A solver run, ready for the executor (see the module docstring for the slot model).

    Attributes:
        instructions: Eval / Combine in execution order.
        times: [num Eval] float64 model times, in evaluation order.
        coeffs: flat float64 coefficient table; Combine c uses coeffs[c.start : c.start + len(c.srcs)].
        num_slots: work slots (0 = input, buffers, velocities); record slots follow them.
        buffers: the work slots that need a preallocated tensor.
        output: the slot that holds the final state.
        record_times: [R] float64 times of the recorded intermediates (empty: none recorded).
        method: a name for reports.
        steps: number of solver steps.
        nfe: model evaluations per sample (the number of Eval instructions).
        views: the executor's cache of table views per (device, dtype), for programs reused
            across calls (the fixed methods' programs are cached); never part of equality.
    """

    instructions: Tuple[Union[Eval, Combine], ...]
    times: Tensor
    coeffs: Tensor
    num_slots: int
    buffers: Tuple[int, ...]
    output: int
    record_times: Tensor
    method: str
    steps: int
    nfe: int
    views: dict = field(default_factory=dict, compare=False, repr=False)

    INPUT = 0

    @property
    def num_records(self) -> int:
        return int(self.record_times.numel())

    def structure(self) -> tuple:
        """Everything but the table values: equal structures run the same launches (CUDA graphs)."""
        return (self.instructions, self.num_slots, self.buffers, self.output,
                self.num_records, self.times.numel(), self.coeffs.numel())


class ProgramBuilder:
    """Collects instructions and their table entries; ``build`` packs the tables once.

    Fixed methods give every time and coefficient as a Python float (one ``torch.tensor`` at the
    end). Learned solvers leave them out (None) and hand ``build`` whole float64 tables, computed in
    a few batched ops and possibly carrying autograd history, in instruction order.
    """

    def __init__(self, method: str):
        self.method = method
        self._instructions: List[Union[Eval, Combine]] = []
        self._times: List[Optional[float]] = []
        self._coeffs: List[Optional[float]] = []
        self._num_slots = 1  # slot 0: the input
        self._buffers: List[int] = []
        self._record_times: List[float] = []
        self._steps = 0

    @property
    def input(self) -> int:
        return Program.INPUT

    def buffer(self) -> int:
        """A new slot with its own preallocated tensor (states written by Combine)."""
        self._buffers.append(self._num_slots)
        self._num_slots += 1
        return self._num_slots - 1

    def velocity(self) -> int:
        """A new slot rebound to each model output written to it."""
        self._num_slots += 1
        return self._num_slots - 1

    def eval(self, dst: int, src: int, time: Optional[float] = None) -> None:
        # a model output is rebound to its slot: into a buffer it would replace the tensor that later
        # combinations (and a captured CUDA graph) write in place
        if dst == Program.INPUT or dst in self._buffers or not 0 < dst < self._num_slots:
            raise ValueError(f"eval: slot {dst} is not a velocity slot (from velocity())")
        self._instructions.append(Eval(dst, src, len(self._times)))
        self._times.append(time)

    def combine(self, dst: int, srcs: Sequence[int], coeffs: Optional[Sequence[float]] = None) -> None:
        if coeffs is not None and len(coeffs) != len(srcs):
            raise ValueError(f"combine: {len(srcs)} sources but {len(coeffs)} coefficients")
        if dst >= 0 and dst not in self._buffers:  # negative: a record slot (record())
            raise ValueError(f"combine: slot {dst} is not a buffer slot (from buffer())")
        self._instructions.append(Combine(dst, tuple(srcs), len(self._coeffs)))
        self._coeffs.extend(coeffs if coeffs is not None else [None] * len(srcs))

    def record(self, time: float, srcs: Sequence[int], coeffs: Optional[Sequence[float]] = None) -> None:
        """Write the next intermediate: a combination of states (a copy, or a linear interpolation)."""
        dst = -1 - len(self._record_times)  # resolved to a record slot in build()
        self.combine(dst, srcs, coeffs)
        self._record_times.append(float(time))

    def record_step(self, plan: Sequence[Tuple[float, float]], prev: int, new: int) -> None:
        """Record the intermediates that fall in the step prev -> new: (time, w) means
        (1 - w) prev + w new, the linear interpolation of torchdiffeq's fixed-grid solvers."""
        for time, w in plan:
            if w == 1.0:
                self.record(time, (new,), [1.0])
            elif w == 0.0:
                self.record(time, (prev,), [1.0])
            else:
                self.record(time, (prev, new), [1.0 - w, w])

    def end_step(self) -> None:
        self._steps += 1

    def build(self, output: int, times: Optional[Tensor] = None, coeffs: Optional[Tensor] = None) -> Program:
        """The program; ``times`` / ``coeffs``: the whole tables, for entries given as None."""
        num_slots = self._num_slots
        # Record slots come after the work slots: dst -1 - j becomes num_slots + j.
        instructions = tuple(
            Combine(num_slots - 1 - op.dst, op.srcs, op.start) if isinstance(op, Combine) and op.dst < 0 else op
            for op in self._instructions
        )
        return Program(
            instructions=instructions,
            times=_table("times", self._times, times),
            coeffs=_table("coeffs", self._coeffs, coeffs),
            num_slots=num_slots,
            buffers=tuple(self._buffers),
            output=output,
            record_times=torch.tensor(self._record_times, dtype=torch.float64),
            method=self.method,
            steps=self._steps,
            nfe=sum(isinstance(op, Eval) for op in instructions),
        )


def _table(name: str, entries: List[Optional[float]], given: Optional[Tensor]) -> Tensor:
    if given is None:
        if any(e is None for e in entries):
            raise ValueError(f"build: some {name} were left out but no {name} table was given")
        return torch.tensor(entries, dtype=torch.float64)
    if any(e is not None for e in entries) or given.numel() != len(entries) or given.dim() != 1:
        raise ValueError(f"build: a {name} table must be 1-D with one entry per left-out value "
                         f"({len(entries)}), got shape {tuple(given.shape)}")
    return given.to(torch.float64)
