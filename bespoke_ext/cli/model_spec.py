"""The model argument of ``bespoke-ext train`` and ``bespoke-ext sample``: one parser for both.

A model is one of
  - ``module:attribute``: a velocity model ``model(x, t)``, or a zero-argument factory returning one
    (an object with ``.velocity`` and ``.shape``, like an embedded model, is accepted too);
  - a checkpoint file: ``<name>.safetensors`` with its card ``<name>.json`` next to it (the format of the
    package's embedded models);
  - the name of an embedded model ("moons2d", "mnist", ...).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["resolve_model", "ResolvedModel", "check_device", "import_target", "parse_shape", "parse_extras", "DTYPES"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, None: None}


def _factory_or_model(obj):
    """Call zero-argument factories (functions or classes); keep models (modules, (x, t) callables)."""
    if isinstance(obj, torch.nn.Module):
        return obj
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismethod(obj):
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            return obj
        required = [p for p in sig.parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not required:
            return obj()
    return obj


def import_target(spec: str, what: str = "model"):
    """The object ``module:attribute`` (or ``path/to/file.py:attribute``) names; ValueError naming ``what``
    and the spec when the module cannot be imported or has no such attribute. A module next to the caller
    (the current folder) is found as ``python -m`` would find it."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected module:attribute or path/to/file.py:attribute")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"{what} {spec!r}: no file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"_bespoke_{what}_{path.stem}", path)
        obj = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(obj)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            obj = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class ResolvedModel(NamedTuple):
    """A command-line model: the velocity field, its per-sample shape (None: not known), a name for file names,
    and its card (embedded models and checkpoints; None for module:attribute)."""

    model: object
    shape: Optional[Tuple[int, ...]]
    name: str
    card: Optional[dict] = None


def resolve_model(spec: str, device=None, dtype=None) -> ResolvedModel:
    """The model a command-line spec names (module docstring)."""
    kw = {}
    if dtype is not None:
        kw["dtype"] = dtype
    if device is not None:
        kw["device"] = check_device(device)
    path = Path(spec)
    if path.suffix in (".safetensors", ".json") and (path.is_file() or path.with_suffix(".json").is_file()):
        from ..models.embedded import load_embedded

        if not path.with_suffix(".json").is_file():
            raise FileNotFoundError(f"model checkpoint {path}: its card {path.with_suffix('.json')} is missing")
        m = load_embedded(path.stem, weights_dir=path.parent, **kw)
        return ResolvedModel(m.velocity, tuple(m.shape), path.stem, m.card)
    if ":" in spec:
        attr = spec.rpartition(":")[2]
        obj = _factory_or_model(import_target(spec, "model"))
        shape = getattr(obj, "shape", None)
        model = getattr(obj, "velocity", obj)
        if not callable(model):
            raise ValueError(f"model {spec!r} is not callable as model(x, t) (got {type(model).__name__})")
        if isinstance(model, torch.nn.Module):
            model = model.to(**{k: v for k, v in kw.items()})
        card = getattr(obj, "card", None)   # an embedded-style model from a factory says its conditioning there
        return ResolvedModel(model, tuple(int(s) for s in shape) if shape is not None else None, attr.split(".")[-1],
                             card if isinstance(card, dict) else None)
    from ..models.embedded import list_embedded, load_embedded

    if spec not in list_embedded():
        raise ValueError(f"model {spec!r} is neither module:attribute, nor an existing .safetensors checkpoint, nor an "
                         f"embedded model ({', '.join(list_embedded()) or 'none installed'})")
    m = load_embedded(spec, **kw)
    return ResolvedModel(m.velocity, tuple(m.shape), spec, m.card)


def check_device(device) -> torch.device:
    """--device as a torch.device that this torch can run on (CUDA-less torch fails with an assertion later):
    training's resolve_device, its message naming the flag."""
    from ..training.distributed import resolve_device

    try:
        return resolve_device(device)
    except ValueError as exc:
        raise ValueError(f"--device: {exc}") from None


def parse_shape(text: str) -> Tuple[int, ...]:
    # every piece between separators must be a size: "2,x" or "2,," is a typo, not the shape (2,)
    pieces = re.split(r"[,x]", text.strip())
    try:
        shape = tuple(int(s) for s in pieces)
    except ValueError:
        raise ValueError(f"--shape must be sizes separated by commas (or x), e.g. 2 or 1,28,28; got {text!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"--shape must hold positive sizes, got {text!r}")
    return shape


def parse_extras(items) -> dict:
    extras = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--extra must be KEY=VALUE, got {item!r}")
        try:
            extras[key] = json.loads(value)
        except json.JSONDecodeError:
            extras[key] = value
    return extras
