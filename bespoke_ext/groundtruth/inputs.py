"""What every ground-truth and loss computation calls the model with: per-sample conditions and the dtype policy.

Per-sample conditions. ``conditions`` is a pool {name: Tensor [M, ...]} (class labels, text embeddings).
Every trajectory, training sample and validation sample draws one row index r in [0, M) (the same
for every name); the model is then called as ``model(x, t, name=pool[name][r], ..., **model_extras)``
with one row per sample of x. Inside this package a batch carries its gathered rows as a dict
{name: Tensor [B, ...]} (``take``), and every function that splits, groups, chunks or tiles the
batch splits the rows the same way (``rows_of``, ``for_positions``).

Dtype policy. Ground truth and solver states are float32 or float64 whatever the model's dtype. A
bfloat16 / float16 model is called in its own dtype: x is cast to it for the call and the velocity
cast back to the state's dtype (``sampling.executor.StateDtype``), so tolerances and Hermite interpolation work in
the state's precision. Times stay in the state's dtype (a model that needs them in its own dtype
casts them itself).
"""

from __future__ import annotations

import contextlib
import inspect

import types
import weakref
from typing import Callable, Dict, Mapping, Optional

import torch
from torch import Tensor
from torch.nn.parameter import is_lazy

from ..models.identity import reachable_state

__all__ = ["check_conditions", "pool_size", "take", "rows_of", "for_positions", "model_call_dtype", "first_tensor",
           "as_positional", "KeywordCall", "dtype_hint", "dtype_hint_on_error", "check_velocity", "LOW_PRECISION", "STATE_DTYPES"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.float64)

Rows = Dict[str, Tensor]


def check_conditions(conditions, extras: Optional[Mapping] = None) -> Optional[Dict[str, Tensor]]:
    """Validate a conditions pool; returns it as a dict of detached tensors (None for None or {}). Clear errors for a
    non-dict, non-tensor values, 0-dim tensors, an empty pool, mismatched leading dimensions, or a
    name that is also a constant extra."""
    if conditions is None:
        return None
    if not isinstance(conditions, Mapping):
        raise TypeError(f"conditions must be None or a dict {{name: Tensor [M, ...]}} of per-sample model inputs, "
                        f"got {type(conditions).__name__}")
    if not conditions:
        return None
    out, sizes = {}, {}
    for name, value in conditions.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"conditions names must be keyword-argument names, got {name!r}")
        if not torch.is_tensor(value):
            raise TypeError(f"conditions[{name!r}] must be a tensor [M, ...] (one row per condition), got "
                            f"{type(value).__name__}; convert it with torch.as_tensor, or pass a constant input "
                            f"in model_extras")
        if value.dim() == 0:
            raise ValueError(f"conditions[{name!r}] is 0-dimensional; a pool needs a leading dimension M of rows "
                             f"(a constant input belongs in model_extras)")
        if value.shape[0] == 0:
            raise ValueError(f"conditions[{name!r}] has no rows (leading dimension 0)")
        # model inputs, not parameters: rows still attached to the graph that made them (an encoder's output)
        # would leak the losses' gradients into it and fail at the second backward through that graph
        out[name], sizes[name] = value.detach(), int(value.shape[0])
    if len(set(sizes.values())) > 1:
        raise ValueError(f"conditions must share one leading dimension M (every sample draws the same row of "
                         f"every name); got leading dimensions {sizes}")
    clash = sorted(set(out) & set(extras or {}))
    if clash:
        raise ValueError(f"{clash} given both in conditions and in model_extras; a name is either per-sample "
                         f"(conditions) or constant (model_extras)")
    return out


def pool_size(conditions: Optional[Mapping]) -> int:
    """M, the number of rows of the pool (0 for no conditions)."""
    return int(next(iter(conditions.values())).shape[0]) if conditions else 0


def take(conditions: Optional[Mapping], rows: Optional[Tensor], device=None) -> Rows:
    """{name: pool[name][rows]} on ``device`` (default: the pool's), or {} without conditions."""
    if not conditions or rows is None:
        return {}
    out = {}
    for name, pool in conditions.items():
        got = pool[rows.to(pool.device)]
        out[name] = got if device is None else got.to(device)
    return out


def rows_of(cond: Optional[Mapping], index) -> Rows:
    """The rows of gathered per-sample conditions at ``index`` (a slice or an index tensor)."""
    if not cond:
        return {}
    return {name: (v[index] if isinstance(index, slice) else v[index.to(v.device)]) for name, v in cond.items()}


def for_positions(cond: Optional[Mapping], positions: slice, batch: int) -> Rows:
    """Rows for flattened (time or step, sample) positions p = i * batch + b in ``positions``: sample p % batch.

    Used where a batch of ``batch`` samples is evaluated at several times in one flattened call (the
    bound loss's n*B teacher-forced pairs, velocities on a grid): the rows are tiled like the states.
    """
    if not cond:
        return {}
    p = torch.arange(positions.start, positions.stop)
    return rows_of(cond, p % batch)


def velocity_of(model):
    """The velocity field of what a user passes as the model: the object itself when it is callable, else
    its ``velocity`` field (an embedded model from ``bespoke_ext.models.load_embedded``), else the object
    as given (for the caller's own "not callable" error)."""
    return model if callable(model) else getattr(model, "velocity", model)


def model_call_dtype(model) -> Optional[torch.dtype]:
    """The dtype a module computes in when that is bf16/fp16, else None: the dtype holding most of its
    floating parameter and buffer elements. Most, not the first: a diffusers model keeps a few modules
    (norms, embeddings) in float32 around a bf16 body, and a float32 network may carry a small bf16
    table. sample() asks on every call: the count (a walk over every submodule, ~1 ms for thousands of
    them) is remembered per module and redone when its first or last floating parameter (buffer, for a
    module without parameters) was replaced or changed dtype, as ``.to()``, ``.half()`` and ``.float()``
    do. Uninitialised (lazy) parameters count 0."""
    if isinstance(model, KeywordCall):
        model = model.model
    if isinstance(model, types.MethodType):        # a bound method: its module (not getattr: on a module
        model = model.__self__                      # nn.Module.__getattr__ would format an AttributeError)
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        kind = "_parameters"
        first = first_tensor(model, kind, floating=True)
        if first is None:
            kind, first = "_buffers", first_tensor(model, "_buffers", floating=True)
        stamp = tuple((t.dtype, t.data_ptr(), t.device) if t is not None and not is_lazy(t) else None
                      for t in (first, _last_tensor(model, kind) if first is not None else None))
    except KeyError:  # passes for a module without its registries (a mock): count every time
        return _majority([*model.parameters(), *model.buffers()])
    known = _CALL_DTYPES.get(model)
    if known is None or known[0] != stamp:
        known = (stamp, _majority([*model.parameters(), *model.buffers()]))  # torch lists shared weights once
        try:
            _CALL_DTYPES[model] = known
        except TypeError:  # not weak-referenceable: counted again next time
            pass
    return known[1]


_CALL_DTYPES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # module -> (stamp, call dtype)


def _majority(tensors) -> Optional[torch.dtype]:
    counts: Dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point() and not is_lazy(t):
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    if not counts:
        return None
    most = max(counts, key=lambda d: counts[d])
    return most if most in LOW_PRECISION else None


def _last_tensor(module: torch.nn.Module, kind: str) -> Optional[Tensor]:
    """The last floating tensor ``module.parameters()`` / ``.buffers()`` would yield (registries, reversed)."""
    registries = vars(module)
    for child in reversed(registries["_modules"].values()):
        if child is not None:
            t = _last_tensor(child, kind)
            if t is not None:
                return t
    for t in reversed(registries[kind].values()):
        if t is not None and t.is_floating_point():
            return t
    return None


def first_tensor(module: torch.nn.Module, kind: str, floating: bool = False) -> Optional[Tensor]:
    """The first (floating) tensor that ``module.parameters()`` (kind "_parameters") or ``.buffers()`` would
    yield: the module's own, then its submodules' in registration order. Read from the registries directly,
    as sample() asks on every call and the generators cost 10-30 us (more when the model's forward has just
    evicted the caches). KeyError for an object that passes for a module without the registries (a mock)."""
    registries = vars(module)
    for t in registries[kind].values():
        if t is not None and (not floating or t.is_floating_point()):
            return t
    for child in registries["_modules"].values():
        if child is not None:
            t = first_tensor(child, kind, floating)
            if t is not None:
                return t
    return None


def as_positional(model: Callable) -> Callable:
    """The model as the package calls it, ``model(x, t, **extras)``.

    flow_matching calls ``model(x=x, t=t, **extras)``, by keyword; the package calls by position (torch
    modules and most functions take ``(x, t)``, whatever their names). The two agree unless the
    signature names ``x`` and ``t`` in another order (``forward(self, t, x)``) or keyword-only
    (``forward(self, *, x, t)``): such a model gets a wrapper that calls it by keyword, as flow_matching
    does. A model whose first two names are torchdiffeq's order under other names (``f(t, y)``) would
    get the state as its time: a TypeError. Decided once per function; the wrapper is one per model
    (held weakly), so per-model caches such as CUDA graphs see the same object on every call.
    """
    target = model.forward if isinstance(model, torch.nn.Module) else model
    func = getattr(target, "__func__", target)
    try:
        kind = _CALLS.get(func)
    except TypeError:   # not weak-referenceable / hashable: looked at every time
        kind = None
    if kind is None:
        kind = _calling_convention(target)
        try:
            _CALLS[func] = kind
        except TypeError:
            pass
    if kind == "positional":
        return model
    if kind == "keywords":
        try:
            wrapper = _KEYWORD_CALLS.get(model)
            if wrapper is None:
                wrapper = _KEYWORD_CALLS[model] = KeywordCall(weakref.ref(model))
            return wrapper
        except TypeError:
            return KeywordCall(model)
    first, second = kind
    raise TypeError(f"the model's first arguments are ({first}, {second}), torchdiffeq's order, but it is "
                    f"called as model(x, t, **extras) (flow_matching's): wrap it, e.g. "
                    f"lambda x, t, **kw: model(t, x, **kw)")


def _calling_convention(target):
    """"positional", "keywords", or the (time, state) names of a torchdiffeq-order signature."""
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):   # no signature (a builtin): called by position
        return "positional"
    by_name = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    first = tuple(p.name for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[:2]
    if first == ("x", "t"):
        return "positional"
    if all(name in params and params[name].kind in by_name for name in ("x", "t")):
        return "keywords"
    if len(first) == 2 and first[0] in ("t", "time", "timestep", "sigma") and first[1] in ("x", "x_t", "xt", "y", "z"):
        return first
    return "positional"


def dtype_hint(model, call_dtype) -> str:
    """For an error that mentions dtypes: why the model may have met x in a dtype it does not compute in
    (a function around a bf16/fp16 network, or a module of mixed dtypes), or "" when neither applies."""
    model = model.model if isinstance(model, KeywordCall) else model
    module = getattr(model, "__self__", model)
    if not isinstance(module, torch.nn.Module):
        # a function around a low-precision network: only a module's own dtype is known to be its call dtype
        low = sorted({str(p.dtype) for m in reachable_state(model)[0] for p in m.parameters() if p.dtype in LOW_PRECISION})
        return (f" (the function reaches a network with {', '.join(low)} weights but is called with x in {call_dtype}: "
                f"pass the module itself, which is called in its own dtype, or cast x inside the function)"
                if low else "")
    kinds = sorted({str(t.dtype) for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()})
    if len(kinds) < 2:
        return ""
    return (f" (the module holds {', '.join(kinds)} tensors; it is called in {call_dtype}, the dtype of most of "
            f"their elements: its forward must accept x in that dtype)")


@contextlib.contextmanager
def dtype_hint_on_error(model, call_dtype):
    """Re-raise a model's dtype error with ``dtype_hint``'s reason, when there is one (sampling's)."""
    try:
        yield
    except RuntimeError as exc:
        hint = dtype_hint(model, call_dtype) if "dtype" in str(exc).lower() else ""
        if hint:
            raise RuntimeError(f"{exc}{hint}") from exc
        raise


class KeywordCall:
    """Calls ``model(x=x, t=t, **extras)`` (flow_matching's call) for a model whose signature needs it."""

    __slots__ = ("_model", "__weakref__")

    def __init__(self, model):
        self._model = model   # the model, or a weak reference to it

    @property
    def model(self) -> Callable:
        m = self._model
        return m() if isinstance(m, weakref.ref) else m

    def __call__(self, x: Tensor, t: Tensor, **extras):
        return self.model(x=x, t=t, **extras)

    @property
    def network_forwards(self):
        return getattr(self.model, "network_forwards", None)


_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()           # function -> calling convention
_KEYWORD_CALLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()   # model -> its KeywordCall


def check_velocity(v, x: Tensor, time: Tensor, method: str) -> None:
    """The model's output must be a tensor like its input x (checked once per call, no sync)."""
    if torch.is_tensor(v) and v.shape == x.shape and v.dtype == x.dtype and v.device == x.device:
        return
    # Only now read the time (a host sync on CUDA) to say where it happened.
    at = f"model(x, t={float(time.detach()):.6g}) while sampling with {method!r}"
    if not torch.is_tensor(v):
        raise TypeError(f"{at} returned {type(v).__name__}; expected a velocity tensor of x's shape {tuple(x.shape)}")
    if v.shape != x.shape:
        raise ValueError(f"{at} returned shape {tuple(v.shape)}; expected x's shape {tuple(x.shape)}")
    if v.dtype != x.dtype:
        raise ValueError(f"{at} returned dtype {v.dtype}; expected x's dtype {x.dtype} (cast inside the model)")
    raise ValueError(f"{at} returned a tensor on {v.device}; expected x's device {x.device}")
