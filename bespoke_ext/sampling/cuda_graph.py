"""Replaying a whole fixed-NFE sampling run, model included, as one CUDA graph.

The first call for a (model, program structure, x0 shape/dtype/device, extras signature) runs the
program once on a side stream (lazy initialisation, library workspaces and kernel choices happen
outside capture), then captures it into a CUDA graph. Every call copies its inputs into the graph's
static tensors (x0, the time and coefficient tables, tensor extras) and replays: one launch for the
whole run. Outputs are cloned out of the graph's memory, which the next replay overwrites.

Requirements on the model (as for any CUDA-graph capture): no host synchronisation, no
data-dependent control flow, no CPU tensors created per call; tensor extras on the GPU. Weights
updated in place are seen by later replays; weights replaced by new tensors are not (call
``clear_cuda_graphs()``).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .executor import check_velocity, coefficient_dtype, combine_into, prepare, run_steps, stats_of
from ..program import Program
from .stats import ForwardCounter, SampleStats

__all__ = ["execute_graphed", "clear_cuda_graphs"]

_MAX_GRAPHS = 8
_graphs: "OrderedDict[tuple, _GraphedRun]" = OrderedDict()


def clear_cuda_graphs() -> None:
    """Drop every cached graph (and the GPU memory its pool holds)."""
    _graphs.clear()


def execute_graphed(program: Program, model: Callable, x0: Tensor, extras: dict
                    ) -> Tuple[Tensor, Optional[Tensor], SampleStats]:
    """Like executor.execute (inference only), through a cached CUDA graph."""
    key = (id(model), program.structure(), tuple(x0.shape), x0.dtype, x0.device, _extras_signature(extras))
    run = _graphs.get(key)
    if run is None or run.model() is not model:
        run = _GraphedRun(program, model, x0, extras)
        _graphs[key] = run
        while len(_graphs) > _MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    final, traj = run.replay(program, x0, extras)
    return final, traj, stats_of(program, run.counter)


def _extras_signature(extras: dict) -> tuple:
    sig = []
    for name in sorted(extras):
        v = extras[name]
        if torch.is_tensor(v):
            sig.append((name, "tensor", tuple(v.shape), v.dtype, v.device))
        else:
            try:
                hash(v)
                sig.append((name, "value", v))
            except TypeError:  # unhashable: the graph is reused only for this very object
                sig.append((name, "object", id(v)))
    return tuple(sig)


def _model_ref(model: Callable):
    try:
        return weakref.ref(model)
    except TypeError:  # not weak-referenceable: keep it alive with the graph
        return lambda: model


def _on_side_stream(fn: Callable[[], None], device: torch.device) -> None:
    """Warm-up run: lazy initialisation, library workspaces and kernel choices happen here, on a
    side stream, as CUDA-graph capture requires."""
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode():
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def _capture(fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), torch.cuda.graph(graph):
        fn()
    return graph


class _GraphedRun:
    def __init__(self, program: Program, model: Callable, x0: Tensor, extras: dict):
        self.model = _model_ref(model)
        self.counter = ForwardCounter(model)
        with torch.no_grad():
            self.x0 = x0.clone()
            self.extras = {k: v.clone() if torch.is_tensor(v) else v for k, v in extras.items()}
            # Own copies (copy=True): replays overwrite them with each call's tables.
            self.times = program.times.detach().to(device=x0.device, dtype=x0.dtype, copy=True)
            self.coeffs = program.coeffs.detach().to(device=x0.device, dtype=coefficient_dtype(x0.dtype), copy=True)
            slots, steps, self.traj = prepare(program, self.x0, tables=(self.times, self.coeffs))

        def first_eval(v, x, t):
            check_velocity(v, x, t, program.method)
            self.counter.after_first_eval()

        _on_side_stream(lambda: run_steps(steps, list(slots), model, self.extras, combine_into, first_eval),
                        x0.device)
        try:
            self.graph = _capture(lambda: run_steps(steps, slots, model, self.extras, combine_into))
        except RuntimeError as exc:
            raise RuntimeError(
                "cuda_graph=True: capturing the sampling loop with the model failed. The model must "
                "not synchronise with the host (.item(), .cpu(), printing tensors), branch on tensor "
                "values or create CPU tensors per call; run without cuda_graph otherwise"
            ) from exc
        # The output is a buffer slot (written by the last Combine): its address is static.
        self.output = slots[program.output]

    def replay(self, program: Program, x0: Tensor, extras: dict) -> Tuple[Tensor, Optional[Tensor]]:
        with torch.no_grad():
            self.x0.copy_(x0)
            self.times.copy_(program.times.detach())
            self.coeffs.copy_(program.coeffs.detach())
            for k, v in extras.items():
                if torch.is_tensor(v):
                    self.extras[k].copy_(v)
            self.graph.replay()
            return self.output.clone(), (self.traj.clone() if self.traj is not None else None)
