"""The executor: the only loop over solver stages in the package.

It runs a :class:`Program` (see program.py). Before the loop: the float64 time and coefficient
tables are cast to the state's device (times in the state's dtype, coefficients in the math type of
the fused ops: float32, or float64 for float64 states) and every Eval's time and every Combine's
coefficient row is sliced as a view (once per program, device and dtype: reused programs keep them
in ``Program.views``), and the buffers are allocated (every call: results are handed out). The
loop then does nothing per stage but the model call or one ``rk_update_out`` launch: no
allocation of its own, no host synchronisation, no autograd (no_grad). With
``enable_grad`` it runs the differentiable ``rk_update`` instead, so gradients reach x0, the model
and the tables (a learned solver's parameters).

No_grad, not inference mode: a model may use autograd inside (guidance), as under flow_matching.
Buffers and the intermediates tensor are allocated outside inference mode, so the tensors returned
are ordinary tensors that later autograd code may use, like flow_matching's results.
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..groundtruth.inputs import check_velocity
from ..program import Eval, Program
from .stats import ForwardCounter, SampleStats, network_forwards_of

__all__ = ["execute", "coefficient_dtype", "device_tables", "StateDtype", "tensor_version"]

_rk_update_out = torch.ops.bespoke_ext.rk_update_out.default

# One resolved instruction: (is_eval, dst, src | srcs, time view | coefficient view).
Step = Tuple[bool, int, object, Tensor]


def coefficient_dtype(state_dtype: torch.dtype) -> torch.dtype:
    """The fused ops compute in float32 (float64 for float64 states): hand them that dtype."""
    return torch.float64 if state_dtype == torch.float64 else torch.float32


def execute(program: Program, model: Callable, x0: Tensor, extras: dict, *,
            enable_grad: bool = False) -> Tuple[Tensor, Optional[Tensor], SampleStats]:
    """Run ``program`` from x0; returns (final state, stacked intermediates or None, stats)."""
    counter = ForwardCounter(model)
    first = _FirstEvalCheck(program.method, counter)
    if enable_grad:
        with torch.enable_grad():
            slots, steps, _ = prepare(program, x0, differentiable=True)
            run_steps(steps, slots, model, extras, _combine_differentiable, first)
            traj = torch.stack(slots[program.num_slots:]) if program.num_records else None
    else:
        with torch.no_grad():  # not inference_mode: models may use autograd inside (guidance)
            slots, steps, traj = prepare(program, x0)
            run_steps(steps, slots, model, extras, combine_into, first)
    return slots[program.output], traj, stats_of(program, counter)


def stats_of(program: Program, counter: ForwardCounter) -> SampleStats:
    return SampleStats(nfe=program.nfe, network_forwards=program.nfe * counter.per_eval,
                       steps=program.steps, method=program.method)


def needs_cast(v, x: Tensor) -> bool:
    """A floating-point model output of another dtype than the state's (autocast): cast to x's dtype."""
    return torch.is_tensor(v) and v.dtype != x.dtype and v.is_floating_point()


class _FirstEvalCheck:
    """Validates the first model output and reads the forward counter; a no-op afterwards.

    Returns (output, model for the later evaluations): a floating-point output of another dtype
    (autocast) is cast, and so is every later one, through StateDtype. A model whose outputs already
    have the state's dtype is called as it is, without a wrapper's frames on every evaluation.
    """

    def __init__(self, method: str, counter: ForwardCounter):
        self.method = method
        self.counter = counter

    def __call__(self, v, x: Tensor, time: Tensor, model: Callable):
        if needs_cast(v, x):
            v, model = v.to(x.dtype), (model if isinstance(model, StateDtype) else StateDtype(model))
        check_velocity(v, x, time, self.method)
        self.counter.after_first_eval()
        return v, model


class StateDtype:
    """The model with floating-point outputs of another dtype (autocast) cast to the state's; with
    ``call_dtype`` (a bf16/fp16 module, a float32/float64 state) also called in its own dtype, x cast
    for the call: how training calls every model, and sample() a bf16/fp16 module.

    One dtype comparison per evaluation; ``network_forwards`` is the model's own counter, so
    SampleStats still counts the network forwards of guided models. Holds the model weakly when
    given a weak reference (sample()'s per-model cache for CUDA graphs never keeps a model alive).
    """

    __slots__ = ("_model", "call_dtype", "__weakref__")

    def __init__(self, model: Callable, call_dtype: Optional[torch.dtype] = None):
        self._model = model  # the model, or a weak reference to it
        self.call_dtype = call_dtype

    @property
    def model(self) -> Callable:
        m = self._model
        return m() if isinstance(m, weakref.ref) else m

    def __call__(self, x: Tensor, t: Tensor, **extras):
        c = self.call_dtype
        v = self.model(x if c is None or x.dtype == c else x.to(c), t, **extras)
        return v.to(x.dtype) if needs_cast(v, x) else v

    @property
    def network_forwards(self):
        return network_forwards_of(self.model)


def prepare(program: Program, x0: Tensor, differentiable: bool = False,
            tables: Optional[Tuple[Tensor, Tensor]] = None
            ) -> Tuple[List[Optional[Tensor]], List[Step], Optional[Tensor]]:
    """Resolve every instruction to its tensors (tables cast once), allocate the buffers and the
    intermediates (not when differentiable: then every combination is a new tensor).

    ``tables``: (times, coeffs) already cast, to be used in place (CUDA graphs' static tables).
    """
    if tables is not None:
        steps = _resolve(program, *tables)
    elif differentiable:
        steps = _resolve(program, *_cast(program.times, program.coeffs, x0))
    else:
        key = (x0.device, x0.dtype)
        steps = program.views.get(key)
        if steps is None:
            steps = program.views[key] = _resolve(program, *device_tables(program, x0))
    slots: List[Optional[Tensor]] = [None] * (program.num_slots + program.num_records)
    slots[program.INPUT] = x0
    traj = None
    if not differentiable:
        for s in program.buffers:
            slots[s] = torch.empty_like(x0, memory_format=torch.contiguous_format)
        if program.num_records:
            traj = x0.new_empty((program.num_records, *x0.shape))
            for j in range(program.num_records):
                slots[program.num_slots + j] = traj[j]
    return slots, steps, traj


def device_tables(program: Program, x0: Tensor) -> Tuple[Tensor, Tensor]:
    """The program's (times, coeffs), detached and cast for x0's device and dtype, cast once per program
    (the copy of CPU tables to a GPU synchronises with the host: later calls reuse the copy)."""
    key = ("tables", x0.device, x0.dtype)
    tables = program.views.get(key)
    if tables is None:
        tables = program.views[key] = _cast(program.times.detach(), program.coeffs.detach(), x0)
    return tables


def _cast(times: Tensor, coeffs: Tensor, x0: Tensor) -> Tuple[Tensor, Tensor]:
    return (times.to(device=x0.device, dtype=x0.dtype),
            coeffs.to(device=x0.device, dtype=coefficient_dtype(x0.dtype)))


def _resolve(program: Program, times: Tensor, coeffs: Tensor) -> List[Step]:
    steps: List[Step] = []
    for op in program.instructions:
        if isinstance(op, Eval):
            steps.append((True, op.dst, op.src, times[op.time]))
        else:
            steps.append((False, op.dst, op.srcs, coeffs[op.start:op.start + len(op.srcs)]))
    return steps


def combine_into(terms: List[Tensor], coeffs: Tensor, out: Tensor) -> Tensor:
    """Inference: write the combination into the slot's preallocated tensor."""
    _rk_update_out(terms, coeffs, out)
    return out


def _combine_differentiable(terms: List[Tensor], coeffs: Tensor, out: Optional[Tensor]) -> Tensor:
    return ops.rk_update(terms, coeffs)


def tensor_version(t: Tensor) -> int:
    """The tensor's version counter (bumped by in-place edits); inference tensors keep none (an in-place
    edit of one, possible only inside inference_mode, cannot be seen: 0)."""
    return 0 if t.is_inference() else t._version


def run_steps(steps: List[Step], slots: List[Optional[Tensor]], model: Callable, extras: dict,
              combine: Callable, first_eval: Optional[Callable] = None) -> None:
    """The hot loop: a model call or one fused combination per instruction, and an identity test of each
    output against the previous one (``_rewritten_output``)."""
    check, last, last_dst, version = first_eval, None, 0, 0
    for k, (is_eval, dst, src, arg) in enumerate(steps):
        if is_eval:
            v = model(slots[src], arg, **extras)
            if check is not None:
                v, model = check(v, slots[src], arg, model)
                check = None
            elif v is last and tensor_version(v) != version and _still_read(steps, k, last_dst):
                raise _rewritten_output()
            slots[dst], last, last_dst, version = v, v, dst, tensor_version(v)
        else:
            terms = [slots[i] for i in src]
            try:
                slots[dst] = combine(terms, arg, slots[dst])
            except RuntimeError as exc:
                # only the first output is checked (the hot loop stays free of checks); name a later one
                # that changed dtype or shape instead of the fused op's complaint about its terms
                _explain_changed_output(terms, exc)
                raise


def _still_read(steps: List[Step], k: int, slot: int) -> bool:
    """Whether a combination after step k reads ``slot`` before an instruction writes it anew."""
    for is_eval, dst, src, _ in steps[k:]:
        if not is_eval and slot in src:
            return True
        if dst == slot:
            return False
    return False


def _rewritten_output() -> ValueError:
    """A model that writes every velocity into one preallocated tensor and returns it overwrites the earlier
    velocities a step still combines (Heun, RK4, every multistep and learned solver), silently. Its in-place
    write bumps the tensor's version counter: an identity test and an integer compare per evaluation find the
    rare case, and ``_still_read`` refuses it only where the overwritten velocity was still to be read (Euler
    and midpoint read each velocity before the next evaluation; a constant tensor returned again unwritten is
    harmless)."""
    return ValueError("the model returned the tensor of its previous call, written over in place (a preallocated "
                      "output buffer): solvers keep earlier velocities, so each call must return a new tensor "
                      "(return out.clone(), or allocate the output per call)")


def _explain_changed_output(terms: List[Tensor], exc: RuntimeError) -> None:
    first = terms[0]
    for t in terms[1:]:
        if torch.is_tensor(t) and (t.dtype != first.dtype or t.shape != first.shape):
            raise ValueError(
                f"a model output changed during sampling: a term of one step is {t.dtype} of shape "
                f"{tuple(t.shape)} where another is {first.dtype} of shape {tuple(first.shape)}. The first "
                f"evaluation is checked (and decides whether outputs are cast to the state's dtype); later "
                f"ones must keep its dtype and shape") from exc
