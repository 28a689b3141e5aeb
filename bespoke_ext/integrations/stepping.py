"""A solver's program run one model evaluation at a time, for loops that someone else drives.

diffusers pipelines and k-diffusion samplers own the loop: they call the model and then hand its
output to a ``step``. :class:`ProgramStepper` replays the same :class:`~bespoke_ext.program.Program`
the executor runs (so a solver samples the same inside a pipeline as through ``bespoke_ext.sample``),
cut at its Eval instructions: ``step(k, f, x)`` stores the k-th evaluation's output f (and its input
x), runs the Combine instructions up to the next Eval through the fused op, and returns the next
evaluation's input (after the last evaluation, the program's output).

``velocity_sign``: the model output's sign relative to the velocity u = dx/dt. diffusers' flow
pipelines hand over dx/dsigma = -u (sigma = 1 - t), so their stepper uses -1: the coefficient of every
term that holds a model output is negated, which is exact in floating point (c * (-f) == -(c * f)),
so the combinations add bit for bit what the executor adds.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..program import Combine, Eval, Program

__all__ = ["ProgramStepper", "state_dtype"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype solver states are kept in: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class ProgramStepper:
    """Replays ``program`` one evaluation at a time (module docstring).

    Attributes:
        nfe: model evaluations.
        eval_times: [nfe] float64 model times, in evaluation order.
    """

    def __init__(self, program: Program, velocity_sign: float = 1.0):
        if velocity_sign not in (1.0, -1.0):
            raise ValueError(f"velocity_sign must be 1 or -1, got {velocity_sign!r}")
        if program.num_records:
            raise ValueError("a program that records intermediates cannot be stepped; build it without them")
        times = program.times.detach().to(torch.float64).cpu()
        coeffs = program.coeffs.detach().to(torch.float64).cpu()
        self.program = program
        self._evals: List[Eval] = []
        self._segments: List[List[Tuple[int, Tuple[int, ...], Tensor]]] = []
        holds_output = set()  # slots whose content is a raw model output (static: the program is)
        for op in program.instructions:
            if isinstance(op, Eval):
                self._evals.append(op)
                self._segments.append([])
                holds_output.add(op.dst)
            elif isinstance(op, Combine):
                if not self._evals:
                    raise ValueError(f"{program.method!r}: a combination before the first model evaluation "
                                     f"cannot be stepped")
                c = coeffs[op.start:op.start + len(op.srcs)].clone()
                for j, src in enumerate(op.srcs):
                    if src in holds_output:
                        c[j] = c[j] * velocity_sign
                self._segments[-1].append((op.dst, op.srcs, c))
                holds_output.discard(op.dst)
        if not self._evals:
            raise ValueError(f"{program.method!r} makes no model evaluations")
        self.nfe = len(self._evals)
        self.eval_times = torch.stack([times[op.time] for op in self._evals])
        self._on_device: Dict[tuple, List[List[Tensor]]] = {}
        self._slots: Dict[int, Tensor] = {}

    # -- state ---------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every state (a new trajectory starts)."""
        self._slots = {}

    def input_slot(self, k: int) -> int:
        return self._evals[k].src

    def startable(self, k: int) -> bool:
        """Whether a trajectory can start at evaluation k from that evaluation's input alone: nothing
        later reads a state from before it (true at a BespokeSolver's step boundaries; only k = 0 for
        non-stationary solvers, whose every step reads x_0)."""
        if not 0 <= k < self.nfe:
            return False
        written = {self._evals[k].src}
        for j in range(k, self.nfe):
            written.add(self._evals[j].dst)
            for dst, srcs, _ in self._segments[j]:
                if any(s not in written for s in srcs):
                    return False
                written.add(dst)
            if j + 1 < self.nfe and self._evals[j + 1].src not in written:
                return False
        return True

    def coefficients(self, device, dtype) -> List[List[Tensor]]:
        """The combinations' coefficient rows on ``device`` in ``dtype`` (cached: one copy each)."""
        key = (torch.device(device) if device is not None else torch.device("cpu"), dtype)
        rows = self._on_device.get(key)
        if rows is None:
            rows = self._on_device[key] = [[c.to(device=key[0], dtype=dtype) for _, _, c in seg]
                                           for seg in self._segments]
        return rows

    # -- stepping ------------------------------------------------------------------------------------
    def step(self, k: int, output: Tensor, x: Optional[Tensor]) -> Tensor:
        """Store evaluation k's model output (and its input ``x``; None: keep the stored one) and
        return the next evaluation's input, or the final state after the last evaluation."""
        if not 0 <= k < self.nfe:
            raise IndexError(f"evaluation {k} out of range: the solver makes {self.nfe}")
        ev = self._evals[k]
        if x is not None:
            self._slots[ev.src] = x
        elif ev.src not in self._slots:
            raise ValueError(f"evaluation {k}: no stored input state")
        self._slots[ev.dst] = output
        rows = self.coefficients(output.device, output.dtype)[k]
        for (dst, srcs, _), c in zip(self._segments[k], rows):
            try:
                terms = [self._slots[s] for s in srcs]
            except KeyError:
                raise ValueError(
                    f"evaluation {k} of {self.nfe}: this step needs a state from before the trajectory "
                    f"started; the solver ({self.program.method!r}) cannot start here (start at a step "
                    f"boundary, or at the beginning for a non-stationary solver)") from None
            self._slots[dst] = ops.rk_update(terms, c)
        nxt = self._evals[k + 1].src if k + 1 < self.nfe else self.program.output
        return self._slots[nxt]
