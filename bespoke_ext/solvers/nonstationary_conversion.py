"""Any explicit linear solver as a member of the non-stationary family (method.md §9): its times and its
a_i, b_ij, read off the program it runs (``convert_program``)."""

from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
from torch import Tensor

from ..program import Combine, Eval, Program
from .dpm_solver import DPM_METHOD, dpm_solver_program
from .tableaus import TABLEAUS, canonical_method, fixed_step_program
from .time_grid import steps_for_nfe, uniform_grid

__all__ = ["NonStationaryTables", "convert_program", "method_program"]


class NonStationaryTables(NamedTuple):
    """A member as float64 CPU tables: times [n+1] (t_0..t_{n-1} the model times, t_n = 1), a [n],
    b [n, n] lower triangular, refs: each step's reference state (module docstring)."""

    times: Tensor
    a: Tensor
    b: Tensor
    refs: Tuple[int, ...]


def convert_program(program: Program) -> NonStationaryTables:
    """The non-stationary form of a linear solver's program (method.md §9).

    Every slot's content is tracked as a coefficient vector over [x_0, U_0, ..., U_{n-1}] (float64):
    the k-th model evaluation's input is state x_k, the output x_n; a step's reference is the state
    its combination starts from (else the previous state). ValueError when the program is not a
    member: model times must start at 0 and increase strictly below 1, the first evaluation must see x_0.
    """
    n, name = program.nfe, repr(program.method)
    if n < 1:
        raise ValueError(f"{name}: a program without model evaluations has no non-stationary form")
    times = [float(v) for v in program.times.detach().to(torch.float64).cpu()]
    coeffs = program.coeffs.detach().to(torch.float64).cpu()
    x0 = torch.eye(n + 1, dtype=torch.float64)[0]
    vec = {program.INPUT: x0}      # slot -> its content (one tensor object per value written)
    first = {id(x0): None}         # content -> the content its combination started from
    state = {id(x0): 0}            # content -> state index
    rows, refs, eval_times = [], [], []
    alive = [x0]                   # every content stays referenced, so no id() is reused

    def become_state(v: Tensor) -> None:  # v is x_k, k = len(rows) + 1, made by step k - 1
        prev = len(rows)
        ref = state.get(id(v), state.get(id(first[id(v)]), prev) if first[id(v)] is not None else prev)
        state.setdefault(id(v), prev + 1)
        rows.append(v)
        refs.append(min(ref, prev))

    try:
        for op in program.instructions:
            if isinstance(op, Eval):
                if not eval_times and not torch.equal(vec[op.src], x0):
                    raise ValueError(f"{name}: the first model evaluation does not see x_0 itself; not a member "
                                     f"of the non-stationary family")
                if eval_times:
                    become_state(vec[op.src])
                u = torch.eye(n + 1, dtype=torch.float64)[len(eval_times) + 1]
                eval_times.append(times[op.time])
                vec[op.dst], first[id(u)] = u, None
                alive.append(u)
            elif isinstance(op, Combine):
                c = coeffs[op.start:op.start + len(op.srcs)]
                v = sum(c[j] * vec[src] for j, src in enumerate(op.srcs))
                vec[op.dst], first[id(v)] = v, vec[op.srcs[0]]
                alive.append(v)
        become_state(vec[program.output])
    except KeyError as exc:
        raise ValueError(f"{name}: slot {exc} is read before it is written") from None
    grid = eval_times + [1.0]
    if grid[0] != 0.0 or not all(a < b for a, b in zip(grid[:-1], grid[1:])):
        raise ValueError(
            f"{name} is not a member of the non-stationary family: its model times must start at 0, increase "
            f"strictly and stay below 1 (t_n = 1), got {eval_times}; methods that evaluate twice at one time or "
            f"at t = 1 (heun, rk4) do not convert")
    table = torch.stack(rows)  # [n, n + 1]
    return NonStationaryTables(torch.tensor(grid, dtype=torch.float64), table[:, 0].clone(),
                               torch.tril(table[:, 1:]), tuple(refs))


def method_program(name: str, nfe: int) -> Program:
    """The program ``bespoke_ext.sample(method=name, nfe=nfe)`` runs (same grid, same arithmetic)."""
    key = canonical_method(name)
    if key != DPM_METHOD and key not in TABLEAUS:
        raise ValueError(f"unknown method {name!r}; convertible fixed methods: euler, midpoint, heun3, {DPM_METHOD}")
    grid = uniform_grid(0.0, 1.0, steps_for_nfe(nfe, 1 if key == DPM_METHOD else TABLEAUS[key].stages, key))
    return dpm_solver_program(grid) if key == DPM_METHOD else fixed_step_program(TABLEAUS[key], grid)


