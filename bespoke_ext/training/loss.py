"""The training losses of method.md §5, as batched computations over a solver's coefficient table.

Bound loss (the paper's). Teacher forcing: step i starts from the ground truth x(t_i) and is compared
with x(t_{i+1}); all n steps are independent, so they run as ONE batch of n*B samples:

    u1  = u(x(t_i), t_i)                                  (one model call over n*B samples)
    x_m = mid_i[0] x(t_i) + mid_i[1] u1                   (rk_update, one coefficient row per sample)
    u2  = u(x_m, t_m)                                     (one model call over n*B samples)
    d_i = || upd_i[0] x(t_i) + upd_i[1] x_m + upd_i[2] u2 - x(t_{i+1}) ||   (rk_residual, per sample)
    (order 1: d_i = || upd_i[0] x(t_i) + upd_i[1] u1 - x(t_{i+1}) ||)

    loss = mean over x0 of sum_i M_i d_i,   M_i = prod_{j=i+1}^{n-1} L_j,  M_{n-1} = 1

Gradients reach theta through the coefficient rows, the model's time inputs (t_i, t_m), x_m, the
weights M_i, and the ground-truth states themselves (their times are learnable: x_aux or Hermite).

End-to-end loss (the follow-up paper's; a fine-tuning option): mean over x0 of || x_n(theta) - x(1) ||
through the whole n-step solver. x_n is the executor's (sampling/executor.py, the only loop over stages)
run of ``solver.program()`` with ``enable_grad``: the very arithmetic of ``bespoke_ext.sample`` (float32
coefficients for float32 states, a 0-dim time per evaluation), differentiable in the program's tables,
which carry theta's autograd history. The bound loss is not a rollout: its n teacher-forced steps are
independent and run as one batch of n*B samples with a coefficient row per sample, which the
executor's shared-coefficient loop cannot express.

Memory: the n*B evaluations are split into chunks of at most ``chunk_size`` samples. Each chunk's
graph (model activations) is built, back-propagated and freed before the next; the small tensors that
depend on theta (coefficients, weights, ground-truth states) enter every chunk as detached leaves whose
gradients accumulate, and one final backward carries them to theta. The result equals one big backward
up to summation order. The end-to-end loss chunks the same way over samples (chunk_size // n samples
per chunk, each running all n steps); its leaves are the program's two tables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor

from .. import ops
from ..groundtruth.inputs import for_positions, rows_of
from ..metrics.errors import per_sample_rms
from ..program import Program
from ..sampling.executor import execute

__all__ = ["lipschitz_weights", "SolverTable", "solver_table", "bound_loss", "end_to_end_loss",
           "local_errors", "final_errors", "solver_program", "Recomputed"]


def lipschitz_weights(L: Tensor) -> Tensor:
    """M_i = prod_{j=i+1}^{n-1} L_j for i = 0..n-1 (M_{n-1} = 1): a reversed cumulative product."""
    if L.dim() != 1 or L.numel() < 1:
        raise ValueError(f"L must be a 1-D tensor of per-step Lipschitz constants, got shape {tuple(L.shape)}")
    shifted = torch.cat([L[1:], L.new_ones(1)])            # (L_1, ..., L_{n-1}, 1)
    return torch.flip(torch.cumprod(torch.flip(shifted, [0]), 0), [0])


@dataclass
class SolverTable:
    """What a loss needs from a solver, as tensors that may carry the solver's graph.

    times [n+1] state times; stage_times [n, order]; mid [n, 2] (order 2 only); update [n, 2 or 3];
    weights [n] the M_i (bound loss only).
    """

    times: Tensor
    stage_times: Tensor
    update: Tensor
    mid: Optional[Tensor] = None
    weights: Optional[Tensor] = None

    @property
    def steps(self) -> int:
        return self.update.shape[0]

    @property
    def order(self) -> int:
        return self.stage_times.shape[1]

    def named(self) -> Dict[str, Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def detached_leaves(self) -> "SolverTable":
        """A copy whose tensors are fresh leaves (requires_grad) cut from the solver's graph."""
        return SolverTable(**{k: v.detach().requires_grad_(True) for k, v in self.named().items()})


def solver_table(solver, L_tau: Optional[float] = None) -> SolverTable:
    """The solver's differentiable coefficient table (+ the weights M_i when L_tau is given)."""
    sc = solver.step_coefficients()
    mid = getattr(sc, "mid", None)
    order = sc.stage_times.shape[1]
    if order not in (1, 2):
        raise ValueError(f"solver order must be 1 or 2, got stage_times of shape {tuple(sc.stage_times.shape)}")
    if (order == 2) != (mid is not None):
        raise ValueError("an order-2 solver must provide `mid` coefficients (and order 1 must not)")
    weights = None if L_tau is None else lipschitz_weights(solver.lipschitz(L_tau=L_tau))
    # grid().t, not times(): times() is detached (it is for sampling), the loss needs the graph.
    times = solver.grid().t if hasattr(solver, "grid") else solver.times()
    return SolverTable(times=times, stage_times=sc.stage_times, update=sc.update, mid=mid, weights=weights)


def _model_time(t: Tensor, like: Tensor) -> Tensor:
    # Per-sample times in the model's dtype; .to keeps the graph (gradients through the time input).
    return t.to(dtype=like.dtype, device=like.device)


def local_errors(model: Callable, table: SolverTable, states: Tensor, *, chunk: slice, extras: dict,
                 conditions: Optional[dict] = None) -> Tensor:
    """Teacher-forced local errors d for the flattened (step, sample) pairs in ``chunk``.

    ``states`` [n+1, B, *shape] is the ground truth at table.times. Pair p = i * B + b is step i of
    sample b, called with sample b's rows of ``conditions`` {name: Tensor [B, ...]} (tiled n times like
    the states). Returns d [len(chunk)].
    """
    n, b = table.steps, states.shape[1]
    shape = states.shape[2:]
    x_in = states[:-1].reshape(n * b, *shape)[chunk]            # x(t_i), step-major
    target = states[1:].reshape(n * b, *shape)[chunk]           # x(t_{i+1})
    rows = lambda c: c.repeat_interleave(b, dim=0)[chunk]       # one coefficient row per (step, sample)
    cond = for_positions(conditions, chunk, b)                  # sample p % B's condition rows
    u1 = model(x_in, _model_time(rows(table.stage_times[:, 0]), x_in), **extras, **cond)
    if table.order == 1:
        return ops.rk_residual([x_in, u1], rows(table.update), target)
    x_m = ops.rk_update([x_in, u1], rows(table.mid))
    u2 = model(x_m, _model_time(rows(table.stage_times[:, 1]), x_in), **extras, **cond)
    return ops.rk_residual([x_in, x_m, u2], rows(table.update), target)


def _chunks(total: int, chunk_size: int) -> List[slice]:
    return [slice(a, min(a + chunk_size, total)) for a in range(0, total, chunk_size)]


def _finish_backward(pairs: Sequence) -> None:
    """Carry leaf gradients back through the small graphs that produced them (stage two)."""
    tensors, grads = [], []
    for original, leaf in pairs:
        if leaf.grad is not None and original.requires_grad:
            tensors.append(original)
            grads.append(leaf.grad)
    if tensors:
        torch.autograd.backward(tensors, grads)


def bound_loss(model: Callable, table: SolverTable, states: Tensor, *, normalizer: Optional[int] = None,
               chunk_size: int = 16384, extras: Optional[dict] = None, backward: bool = False,
               conditions: Optional[dict] = None) -> Tensor:
    """sum over samples of sum_i M_i d_i, divided by ``normalizer`` (default: the batch size B).

    ``conditions``: per-sample model inputs {name: Tensor [B, ...]}, one row per sample of ``states``.

    ``states`` [n+1, B, *shape]: ground truth at ``table.times`` (differentiable in them). With
    ``backward=True`` the gradients are accumulated into the solver's parameters chunk by chunk
    (bounded memory) and a detached loss is returned; otherwise a loss with a graph is returned
    (one chunk at a time is still used for the model calls, but all graphs stay alive).
    """
    if table.weights is None:
        raise ValueError("bound_loss needs the Lipschitz weights: build the table with solver_table(solver, L_tau)")
    n, b = table.steps, states.shape[1]
    if states.shape[0] != n + 1:
        raise ValueError(f"states must hold the ground truth at the n + 1 = {n + 1} solver times, got {states.shape[0]}")
    norm = float(normalizer if normalizer is not None else b)
    extras = extras or {}
    if not backward:
        total = states.new_zeros((), dtype=torch.float64)
        for chunk in _chunks(n * b, chunk_size):
            d = local_errors(model, table, states, chunk=chunk, extras=extras, conditions=conditions)
            total = total + (table.weights.repeat_interleave(b)[chunk] * d.to(torch.float64)).sum()
        return total / norm
    leaves = table.detached_leaves()
    states_leaf = states.detach().requires_grad_(states.requires_grad)
    value = 0.0
    for chunk in _chunks(n * b, chunk_size):
        d = local_errors(model, leaves, states_leaf, chunk=chunk, extras=extras, conditions=conditions)
        part = (leaves.weights.repeat_interleave(b)[chunk] * d.to(torch.float64)).sum() / norm
        part.backward()
        value += float(part.detach())
    _finish_backward([(getattr(table, k), v) for k, v in leaves.named().items()] + [(states, states_leaf)])
    return torch.tensor(value, dtype=torch.float64)


def solver_program(solver, *, differentiable: bool = True) -> Program:
    """The executor's program of ``solver`` (a Program is returned as it is).

    ``differentiable``: built under autograd, so its tables carry theta's history (the loss);
    otherwise built as ``bespoke_ext.sample`` builds it (no grad; memoised by the solver).
    """
    if isinstance(solver, Program):
        return solver
    if isinstance(solver, SolverTable) or not callable(getattr(solver, "program", None)):
        raise TypeError(f"expected a learned solver (with .program(), e.g. BespokeSolver) or its Program, got "
                        f"{type(solver).__name__}; the end-to-end loss and validation run the solver's program "
                        f"through the executor, as sampling does (a SolverTable serves the bound loss only)")
    with torch.set_grad_enabled(differentiable):
        return solver.program()


class Recomputed:
    """``model`` with its activations recomputed in the backward pass instead of stored (gradient
    checkpointing of each evaluation): under autograd a call keeps only its inputs, so a rollout's graph
    holds n states, not n evaluations' activations. Outside autograd it is the model itself."""

    def __init__(self, model: Callable):
        self.model = model

    def __call__(self, x: Tensor, t: Tensor, **extras) -> Tensor:
        if not torch.is_grad_enabled():
            return self.model(x, t, **extras)
        return torch.utils.checkpoint.checkpoint(self.model, x, t, use_reentrant=False, **extras)


def final_errors(model: Callable, program: Program, x0: Tensor, x1: Tensor, *, extras: Optional[dict] = None,
                 enable_grad: bool = True, conditions: Optional[dict] = None) -> Tensor:
    """|| x_n - x(1) || per sample [B] (float64), x_n from ``execute(program, model, x0)``: the sampler itself.

    ``enable_grad`` (the loss) runs the executor's differentiable path, otherwise its inference path
    (validation); both are the arithmetic of ``bespoke_ext.sample(model, x0, solver=solver)``. Per-sample
    ``conditions`` {name: Tensor [B, ...]} are passed as extras, as ``bespoke_ext.sample(..., y=labels)`` does.
    """
    x_n, _, _ = execute(program, model, x0, {**(extras or {}), **(conditions or {})}, enable_grad=enable_grad)
    return per_sample_rms(x_n - x1)


def _per_sample(errors: Tensor, objective: str) -> Tensor:
    """The loss of each sample from its RMS error e = || x_n - x(1) ||: e ("rms"), or log e^2 = log MSE_b
    ("log_mse", the non-stationary paper's loss; PSNR_b = 10 log10(4 / MSE_b), so minimising it maximises
    the mean PSNR). The floor 1e-30 keeps an exact sample finite."""
    if objective == "rms":
        return errors
    if objective == "log_mse":
        return torch.log(errors.pow(2).clamp_min(1e-30))
    raise ValueError(f"objective must be 'rms' or 'log_mse', got {objective!r}")


def end_to_end_loss(model: Callable, solver, x0: Tensor, x1: Tensor, *, normalizer: Optional[int] = None,
                    chunk_size: int = 16384, extras: Optional[dict] = None, backward: bool = False,
                    conditions: Optional[dict] = None, objective: str = "rms") -> Tensor:
    """sum over samples of || x_n(theta; x0) - x(1) || (``objective`` "rms") or of its log square
    ("log_mse"), divided by ``normalizer`` (default B).

    ``conditions``: per-sample model inputs {name: Tensor [B, ...]}, sliced with the samples' chunks.

    ``solver``: a learned solver or its Program; x_n comes from the executor with ``enable_grad``, the
    arithmetic users sample with, and gradients reach theta through the program's tables. Chunked over
    samples (each chunk runs all n steps); ``backward`` as in ``bound_loss``: the tables enter every
    chunk as detached leaves, and one final backward carries their gradients to theta.
    """
    program = solver_program(solver)
    b = x0.shape[0]
    norm = float(normalizer if normalizer is not None else b)
    chunk_samples = max(1, chunk_size // max(1, program.steps))   # a chunk holds n steps' activations
    if not backward:
        total = x0.new_zeros((), dtype=torch.float64)
        for chunk in _chunks(b, chunk_samples):
            total = total + _per_sample(final_errors(model, program, x0[chunk], x1[chunk], extras=extras,
                                                     conditions=rows_of(conditions, chunk)), objective).sum()
        return total / norm
    leaves = dataclasses.replace(program, times=program.times.detach().requires_grad_(program.times.requires_grad),
                                 coeffs=program.coeffs.detach().requires_grad_(program.coeffs.requires_grad),
                                 views={})
    value = 0.0
    for chunk in _chunks(b, chunk_samples):
        part = _per_sample(final_errors(model, leaves, x0[chunk], x1[chunk], extras=extras,
                                        conditions=rows_of(conditions, chunk)), objective).sum() / norm
        if part.requires_grad:
            part.backward()
        value += float(part.detach())
    _finish_backward([(program.times, leaves.times), (program.coeffs, leaves.coeffs)])
    return torch.tensor(value, dtype=torch.float64)
