"""Model identity: what a trajectory cache, a checkpoint or a trained solver was made for.

Ground truth is only ground truth for the model that produced it, so the identity must change
whenever the velocity field can. ``model_tag(model)`` is the model's qualified name plus a sha256
over everything the package can see that shapes the field:

- every tensor of the state dict (names, dtypes, shapes, values) and every non-persistent buffer (a time
  embedding's frequencies: not saved, yet part of the field);
- the primitive settings (numbers, strings, bools, None, bytes, enum members, numpy arrays and scalars,
  and tuples / lists / sets / dicts of them) of the
  module and of every submodule, e.g. ``ClassifierFreeGuidance.guidance_scale``,
  ``VelocityAdapter.prediction`` and ``t_eps``, and tensors held as plain attributes (neither
  parameter nor buffer, so not in the state dict), e.g. a tensor ``null_value``, by value;
- plain objects held as attributes (a schedule), through their own settings (``__dict__`` and
  ``__slots__``, next to a ``to_dict()``, which may leave out what it cannot serialise; a callable object's
  ``__call__`` as a function), and functions held as attributes, through their code, defaults, closure
  values and the globals their code reads;
- for a bound method, the object it is bound to;
- for a module, the tensors, networks and numbers at module level that its class's ``forward`` reads
  (``class Wrapper(nn.Module): def forward(self, x, t): return NET(x, t)``); other globals a forward
  names (functions, helpers, loggers) are library code, left out so the tag stays stable.
Private attributes (``self._scale``) count as public ones do; torch's own bookkeeping on a module (its
parameter, buffer and hook tables) does not. A class may name attributes that do not shape the field
(call counters, a warned-once flag, a lazily filled cache) in a class attribute ``identity_ignore``; they
are left out, so the tag does not change as the model is used. A module class
with ``identity_skip = True`` (the solvers: an object may hold its solver next to its network) is left out
wherever it is reached, so training that solver does not change the model's tag.

``inputs_tag(extras, conditions)`` covers what the model is called with: the values of constant
extras and the whole conditions pool. Cache keys and checkpoint fingerprints use both.

A plain function, lambda or ``functools.partial`` wraps state the package cannot see (a model in a
closure, a global); two such callables may share a qualified name while computing different
fields. ``model_tag`` therefore refuses them with :class:`OpaqueModelError`, unless ``strict=False``,
which hashes what can be seen (code, constants, defaults, closure values, the values of the globals the
code names, a partial's arguments) but cannot follow state reached another way (a global read through an
imported module, a file): callers must then have an explicit tag or cache folder.
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import inspect
import math
import os
import types
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch

__all__ = ["model_tag", "training_tag", "inputs_tag", "reachable_state", "OpaqueModelError"]

_MAX_DEPTH = 6  # nested plain objects followed this deep (cycles are cut by an id set)


class OpaqueModelError(ValueError):
    """A model whose state the package cannot see, used without an explicit identity."""


def _qualname(obj) -> str:
    # Functions and classes name themselves; any other object is named by its class.
    target = obj if inspect.isfunction(obj) or inspect.ismethod(obj) or isinstance(obj, type) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(obj).__name__)}"


def _is_opaque(model) -> bool:
    return isinstance(model, functools.partial) or inspect.isfunction(model) or inspect.isbuiltin(model)


class _Hasher:
    """Feeds a sha256 with a canonical, typed encoding of values (tensors by value)."""

    def __init__(self):
        self.h = hashlib.sha256()
        self.seen: set = set()

    def text(self, s: str) -> None:
        self.h.update(s.encode())
        self.h.update(b"\x00")

    def tensor(self, v: torch.Tensor) -> None:
        # a real contiguous copy: .contiguous() keeps the stride 0 of a size-1 dimension (expand(1).clone()),
        # and the byte view below needs stride 1
        v = v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        self.text(f"tensor|{v.dtype}|{tuple(v.shape)}")
        if v.numel():
            self.h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())

    def value(self, v: Any, depth: int = 0) -> None:
        """Any value the package can read: primitives, containers, tensors, modules, objects."""
        if v is None or isinstance(v, (bool, int, str)):
            self.text(f"{type(v).__name__}|{v!r}")
        elif isinstance(v, float):
            self.text(f"float|{v!r}" if math.isfinite(v) else f"float|{v}")
        elif torch.is_tensor(v):
            self.tensor(v)
        elif isinstance(v, (torch.dtype, torch.device)):
            self.text(f"{type(v).__name__}|{v}")
        elif isinstance(v, enum.Enum):   # its fields are private: the member itself is the setting
            self.text(f"enum|{_qualname(v)}|{v.name}")
            self.value(v.value, depth + 1)
        elif isinstance(v, (bytes, bytearray)):
            self.text(f"bytes|{len(v)}")
            self.h.update(bytes(v))
        elif isinstance(v, (set, frozenset)):
            self.text(f"set|{len(v)}")
            for item in sorted(v, key=repr):
                self.value(item, depth + 1)
        elif isinstance(v, (np.ndarray, np.generic)):   # numpy arrays and scalars (np.float32(3)), by value
            a = np.array(v)   # a contiguous copy, which torch.from_numpy needs
            if a.dtype.kind in "biufc":
                self.tensor(torch.from_numpy(a))
            else:   # strings, objects: by their values' repr
                self.text(f"numpy|{a.dtype}|{a.tolist()!r}")
        elif isinstance(v, (list, tuple)):
            self.text(f"{type(v).__name__}|{len(v)}")
            for item in v:
                self.value(item, depth + 1)
        elif isinstance(v, Mapping):
            self.text(f"mapping|{len(v)}")
            for key in sorted(v, key=repr):
                self.text(repr(key))
                self.value(v[key], depth + 1)
        elif isinstance(v, torch.nn.Module):
            self.module(v)
        elif isinstance(v, types.ModuleType):
            self.text(f"pymodule|{v.__name__}")  # an imported library, by name: its contents are code
        elif isinstance(v, type) or inspect.isbuiltin(v):
            self.text(f"named|{_qualname(v)}")
        elif depth < _MAX_DEPTH:
            self.obj(v, depth)
        else:
            self.text(f"deep|{_qualname(v)}")

    def module(self, m: torch.nn.Module) -> None:
        if id(m) in self.seen:
            self.text("seen")
            return
        self.seen.add(id(m))
        if getattr(type(m), "identity_skip", False):   # a solver held next to the network: not the field
            self.text(f"skipped|{_qualname(m)}")
            return
        self.text(f"module|{_qualname(m)}")
        state = m.state_dict()
        for key, t in sorted(state.items()):
            self.text(key)
            self.tensor(t)
        # buffers registered with persistent=False (a time embedding's frequencies) shape the field but are
        # not in the state dict; keyed apart, so a persistent buffer's tag is the same as before
        for key, t in sorted(m.named_buffers(remove_duplicate=False)):
            if key not in state:
                self.text(f"buffer|{key}")
                self.tensor(t)
        for name, sub in sorted(m.named_modules(), key=lambda kv: kv[0]):
            self.text(f"settings|{name}|{_qualname(sub)}")
            ignore = set(getattr(type(sub), "identity_ignore", ()))
            for key, v in sorted(vars(sub).items()):
                if _module_internal(key) or key in ignore or isinstance(v, torch.nn.Module):
                    continue  # submodules have their own entry
                # a private attribute (self._scale) is as much a setting as a public one
                # parameters and buffers live in _parameters / _buffers (the state dict, above): a tensor
                # here is a plain attribute (a null-condition embedding, a scale), hashed by value
                self.text(key)
                self.value(v, 1)
            for key, v in _forward_globals(type(sub)).items():
                self.text(f"global|{key}")
                self.value(v, 1)

    def obj(self, v: Any, depth: int) -> None:
        if id(v) in self.seen:
            self.text("seen")
            return
        self.seen.add(id(v))
        label, code, parts = _object_parts(v)
        self.text(label)
        if code:
            self.h.update(code)
        for part in parts:
            self.value(part, depth + 1)

    def hexdigest(self) -> str:
        return self.h.hexdigest()[:16]


def _object_parts(v) -> Tuple[str, bytes, list]:
    """(label, code bytes, the values it holds) of an object that is not a primitive, container, tensor or
    module: what its identity hashes and what ``reachable_state`` follows."""
    if isinstance(v, functools.partial):
        return "partial", b"", [v.func, list(v.args), dict(v.keywords)]
    if inspect.ismethod(v):
        return f"method|{v.__func__.__qualname__}", b"", [v.__self__]
    if inspect.isfunction(v):
        code = v.__code__
        # `def f(x, t): return net(x, t)` with a module-level `net`: the global's weights shape the field
        return f"function|{_qualname(v)}", code.co_code, [
            [c for c in code.co_consts if not inspect.iscode(c)], list(v.__defaults__ or ()),
            [cell.cell_contents for cell in (v.__closure__ or ())], _globals_read(v)]
    # a to_dict() (a diffusers config, a schedule) may leave out what it cannot serialise (a custom
    # schedule's functions): it is hashed next to the object's own state, not instead of it
    described = [v.to_dict()] if callable(getattr(v, "to_dict", None)) and _has_no_required_args(v.to_dict) else []
    # a callable object computes with its class's __call__: its code, and the globals that reads (a
    # module-level network), are part of it as a function's are
    call = getattr(type(v), "__call__", None)
    code = [call] if inspect.isfunction(call) else []
    ignore = set(getattr(type(v), "identity_ignore", ()))
    state = {**_slot_state(v), **(getattr(v, "__dict__", None) or {})}
    # private attributes too: a wrapper's self._net, a schedule's self._p shape the field as public ones do
    return f"object|{_qualname(v)}", b"", [*described, {k: s for k, s in state.items() if k not in ignore}, *code]


def _slot_state(v) -> dict:
    """{name: value} of the __slots__ attributes of v's classes (state kept out of __dict__)."""
    state = {}
    for cls in type(v).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in ((slots,) if isinstance(slots, str) else slots):
            if name not in ("__dict__", "__weakref__") and hasattr(v, name):
                state.setdefault(name.strip("_"), getattr(v, name))   # private slots are state too
    return state


def reachable_state(model, exclude=None) -> Tuple[list, list]:
    """(modules, tensors): the torch modules a model callable computes with, and the plain tensors that
    require grad outside them, found along the same edges as the identity (closures, the globals a
    function reads, a partial's arguments, a bound method's object, plain objects' attributes, the
    module-level networks and tensors a module's forward reads). A plain function around a network
    (``lambda x, t: net(x, t)``) reaches ``net``, and so does a module whose forward calls a global
    ``NET``: training freezes its weights and takes its device as a module's. ``exclude`` (the solver being trained, which a user's object may
    hold next to its network) and optimizers are not followed."""
    modules, tensors, seen = [], [], {id(exclude)} if exclude is not None else set()

    def walk(v, depth: int) -> None:
        if v is None or isinstance(v, (bool, int, float, str, bytes, torch.dtype, torch.device, type,
                                       types.ModuleType, torch.optim.Optimizer)) or id(v) in seen:
            return
        seen.add(id(v))
        if isinstance(v, torch.nn.Module):
            if getattr(type(v), "identity_skip", False):
                return
            modules.append(v)
            subs = list(v.modules())
            seen.update(id(sub) for sub in subs)   # in v already: not a second entry
            # a forward that calls a module-level network computes with it (the identity's edge too)
            for sub in subs:
                for g in _forward_globals(type(sub)).values():
                    walk(g, depth + 1)
        elif torch.is_tensor(v):
            if v.requires_grad and v.is_leaf:
                tensors.append(v)
        elif isinstance(v, (list, tuple)):
            for item in v:
                walk(item, depth + 1)
        elif isinstance(v, Mapping):
            for item in list(v.values()):
                walk(item, depth + 1)
        elif depth < _MAX_DEPTH and not inspect.isbuiltin(v):
            for part in _object_parts(v)[2]:
                walk(part, depth + 1)

    walk(model, 0)
    return modules, tensors


def _has_no_required_args(fn) -> bool:
    try:
        return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                   for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature (a builtin): not called
        return False


def _globals_read(fn) -> dict:
    """{name: value} of the module globals that fn's code (nested functions and comprehensions included)
    loads as globals (attribute names that happen to match a global are not).
    Globals the code assigns (``global calls; calls += 1``) are left out: state the function writes, such
    as a call counter, is not an input of the field, and would change the tag at every call."""
    scope = getattr(fn, "__globals__", {})
    return {n: scope[n] for n in _global_names(fn.__code__) if n in scope}


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> Tuple[str, ...]:
    # per code object (a large network's modules share a few classes): the names only, never the values
    names, written, codes = set(), set(), [code]
    while codes:
        c = codes.pop()
        # names loaded as globals, not co_names (which also holds attribute names: self.limit would pull in
        # an unrelated global `limit` and change the tag whenever it changed)
        for i in dis.get_instructions(c):
            if i.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                names.add(i.argval)
            elif i.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                written.add(i.argval)
        codes.extend(k for k in c.co_consts if inspect.iscode(k))
    return tuple(sorted(names - written))


# torch's own bookkeeping on every module, as a bare Module has it in this torch (_parameters, _buffers and
# _modules, hashed through the state dict and named_modules; hook tables; the training flag), and what
# torch.compile, gradient checkpointing, diffusers' hook registry (attached at a pipeline's first call) and
# accelerate's offload hooks attach: how the field is run, not what it is (and a compiled wrapper's id
# differs per process)
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) | {
    "_compiled_call_impl", "_gradient_checkpointing_func", "_diffusers_hook", "_hf_hook", "_old_forward"}


def _module_internal(key: str) -> bool:
    return key in _MODULE_INTERNALS or key.startswith("_torchdynamo")


# what a forward reads at module level that shapes the field: weights and settings, not code
_FIELD_STATE = (torch.Tensor, torch.nn.Module, bool, int, float, str)


def _forward_globals(cls: type) -> dict:
    """{name: value} of the module globals that ``cls.forward`` reads and that are field state (tensors,
    networks, numbers, strings; see _globals_read), as they are now."""
    forward = getattr(cls, "forward", None)
    if not inspect.isfunction(forward):
        return {}
    # dunders (``type(self).__name__`` names the module's own ``__name__``) are the module's metadata
    return {k: v for k, v in _globals_read(forward).items() if isinstance(v, _FIELD_STATE) and not k.startswith("__")}


def model_tag(model, *, strict: bool = True) -> str:
    """``<module.Class>:<sha256 of weights and settings, 16 hex digits>``.

    Raises OpaqueModelError for a plain function, lambda or partial (see the module note); with
    ``strict=False`` such a callable gets ``<module.function>~<sha256 of its code, constants, defaults,
    closure values and the globals it names>``, which does not cover state reached another way.
    """
    name = _qualname(model.func if isinstance(model, functools.partial) else model)
    if _is_opaque(model):
        if strict:
            raise OpaqueModelError(
                f"model {name} is a {'partial' if isinstance(model, functools.partial) else 'plain function'}: "
                f"the package cannot see the state it computes with (weights or settings in a closure or a "
                f"global), so cached ground truth could be reused for a different field. Pass "
                f"model_tag='<a name that changes with the model>' or an explicit cache_dir, or pass the "
                f"torch.nn.Module itself")
        # what can be seen (code, constants, defaults, closure values, named globals, a partial's arguments),
        # after "~": not a full identity (state reached through an imported module is unseen), but two
        # closures over different modules, or functions reading different global modules, differ
        h = _Hasher()
        h.value(model)
        return f"{name}~{h.hexdigest()}"
    h = _Hasher()
    h.value(model)
    return f"{name}:{h.hexdigest()}"


def training_tag(model, model_tag_option=None, cache_dir=None) -> str:
    """The model's tag in bx.train's cache keys, checkpoint fingerprints and solver metadata: the given
    ``model_tag`` option, else ``model_tag(model)``; a callable the package cannot see needs the option or
    an explicit ``cache_dir``, which then enters the tag (a checkpoint made with another folder, another
    model, is refused)."""
    if model_tag_option is not None:
        return str(model_tag_option)
    try:
        return model_tag(model)
    except OpaqueModelError as exc:
        if cache_dir is not None:
            return f"{model_tag(model, strict=False)}@{os.path.abspath(cache_dir)}"
        raise OpaqueModelError(f"train(): {exc} (options of train: model_tag=..., cache_dir=...)") from None


def inputs_tag(extras: Optional[Mapping] = None, conditions: Optional[Mapping] = None) -> str:
    """sha256 (16 hex digits) of the constant extras' values and of the conditions pool."""
    h = _Hasher()
    h.text("extras")
    h.value(dict(extras or {}))
    h.text("conditions")
    h.value(dict(conditions or {}))
    return h.hexdigest()
