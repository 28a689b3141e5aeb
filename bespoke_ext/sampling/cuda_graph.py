"""Replaying a whole fixed-NFE sampling run, model included, as one CUDA graph.

The first call for a (model, program structure, x0 shape/dtype/device, extras signature, autocast
state) runs the program once on a side stream (lazy initialisation, library workspaces and kernel
choices happen outside capture), then captures it into a CUDA graph on x0's device. Every call copies
its inputs into the graph's static tensors (x0, the time and coefficient tables, tensor extras) with
device-to-device copies (no host synchronisation: the tables are cast to the device once per
program) and replays: one launch for the whole run. Outputs are cloned out of the graph's memory,
which the next replay overwrites.

Everything the graph reads or writes stays alive as long as the graph: the static inputs, every
buffer slot and the intermediates. (Memory handed back to the caching allocator while a graph still
writes it on replay would be handed out again, e.g. as the caller's next x0, and overwritten.)

Extras may be nested (dicts, lists, tuples); their tensor leaves must be on x0's device (a CPU
tensor's value would be baked into the graph at capture) and are copied in on every call, and their
other leaves must be hashable: they are part of the cache key, so a changed value captures anew.

Under autocast the capture runs with autocast's weight-cast cache disabled (the cache's tensors
would be freed when autocast exits while the graph still uses them).

Requirements on the model (as for any CUDA-graph capture): no host synchronisation, no
data-dependent control flow, no CPU tensors created per call. Weights updated in place are seen by
later replays; weights replaced by new tensors are not (call ``clear_cuda_graphs()``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ..program import Program
from ..groundtruth.inputs import check_velocity
from .executor import combine_into, device_tables, prepare, run_steps, stats_of
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
    leaves, spec = pytree.tree_flatten(extras)
    key = (id(model), program.structure(), tuple(x0.shape), x0.dtype, x0.device,
           _extras_signature(leaves, spec, x0.device), _autocast_state())
    run = _graphs.get(key)
    if run is None or run.model() is not model:
        run = _GraphedRun(program, model, x0, leaves, spec)
        _graphs[key] = run
        while len(_graphs) > _MAX_GRAPHS:
            _graphs.popitem(last=False)
    _graphs.move_to_end(key)
    final, traj = run.replay(program, x0, leaves)
    return final, traj, stats_of(program, run.counter)


def _extras_signature(leaves: List, spec, device: torch.device) -> tuple:
    sig = [str(spec)]
    for i, v in enumerate(leaves):
        if torch.is_tensor(v):
            if v.device != device:
                raise ValueError(f"cuda_graph=True: model extra #{i} ({pytree.tree_unflatten(leaves, spec)!r:.80}) "
                                 f"holds a tensor on {v.device}; tensor extras must be on x0's device {device} "
                                 f"(a {v.device.type.upper()} tensor's value would be baked into the graph at capture)")
            sig.append(("tensor", tuple(v.shape), v.dtype, v.stride()))
        else:
            try:
                hash(v)
            except TypeError:
                raise ValueError(f"cuda_graph=True: model extra #{i} is an unhashable {type(v).__name__}; "
                                 f"non-tensor extras must be hashable values (they select the graph)") from None
            sig.append(("value", type(v), v))
    return tuple(sig)


def _autocast_state() -> tuple:
    if not torch.is_autocast_enabled("cuda"):
        return (False,)
    return (True, torch.get_autocast_dtype("cuda"))


def _on_device(device: torch.device):
    """x0's device made current (capture and replay run on its streams)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _capture_context():
    """Autocast as the caller has it, but without its weight-cast cache (see the module note)."""
    state = _autocast_state()
    if not state[0]:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=state[1], cache_enabled=False)


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
    with torch.cuda.stream(stream), torch.no_grad(), _capture_context():  # no_grad, as the eager loop
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def _capture(fn: Callable[[], None]) -> "torch.cuda.CUDAGraph":
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), _capture_context(), torch.cuda.graph(graph):
        fn()
    return graph


class _GraphedRun:
    def __init__(self, program: Program, model: Callable, x0: Tensor, leaves: List, spec):
        self.model = _model_ref(model)
        self.counter = ForwardCounter(model)
        with _on_device(x0.device), torch.no_grad():
            self.x0 = x0.clone()
            self.leaves = [v.clone() if torch.is_tensor(v) else v for v in leaves]
            self.extras = pytree.tree_unflatten(self.leaves, spec)
            # Own copies: replays overwrite them with each call's tables.
            times, coeffs = device_tables(program, x0)
            self.times, self.coeffs = times.clone(), coeffs.clone()
            # Kept for the graph's lifetime: the graph writes every buffer slot on each replay. The buffers
            # are also held apart from the slot list, which capture rebinds (an evaluation into a buffer
            # slot would otherwise drop the last reference to a tensor the replays keep writing).
            self.slots, steps, self.traj = prepare(program, self.x0, tables=(self.times, self.coeffs))
            self.buffers = [self.slots[s] for s in program.buffers]

            def first_eval(v, x, t, model):  # the model casts its outputs itself (StateDtype)
                check_velocity(v, x, t, program.method)
                self.counter.after_first_eval()
                return v, model

            _on_side_stream(lambda: run_steps(steps, list(self.slots), model, self.extras, combine_into, first_eval),
                            x0.device)
            try:
                self.graph = _capture(lambda: run_steps(steps, self.slots, model, self.extras, combine_into))
            except RuntimeError as exc:
                raise RuntimeError(
                    "cuda_graph=True: capturing the sampling loop with the model failed. The model must "
                    "not synchronise with the host (.item(), .cpu(), printing tensors), branch on tensor "
                    "values or create CPU tensors per call; run without cuda_graph otherwise"
                ) from exc
        # The output is a buffer slot (written by the last Combine): its address is static.
        self.output = self.slots[program.output]

    def replay(self, program: Program, x0: Tensor, leaves: List) -> Tuple[Tensor, Optional[Tensor]]:
        with _on_device(x0.device), torch.no_grad():
            self.x0.copy_(x0)
            times, coeffs = device_tables(program, x0)  # on the device already: no host sync
            self.times.copy_(times)
            self.coeffs.copy_(coeffs)
            for mine, theirs in zip(self.leaves, leaves):
                if torch.is_tensor(mine):
                    mine.copy_(theirs)
            self.graph.replay()
            return self.output.clone(), (self.traj.clone() if self.traj is not None else None)
