"""What each solver kind's file holds: a schema per kind, checked by the reader (files.py) before any
tensor data is read. A new solver kind with a file registers its schema here, in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

__all__ = ["SolverSchema", "SCHEMAS", "register_schema", "schema_of", "BESPOKE_SCHEMA", "NONSTATIONARY_SCHEMA",
           "Shapes", "short_repr", "clip"]

Shapes = Dict[str, Tuple[int, ...]]


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value, limit: int = 60) -> str:
    """repr(value), clipped: header values may be huge or hostile."""
    return clip(repr(value), limit)


@dataclass(frozen=True)
class SolverSchema:
    """What a solver kind's file holds.

    tensors: the exact set of tensor names.
    derive: tensor shapes -> the config entries they determine (e.g. steps, order); a ValueError
        when no solver of this kind has these shapes.
    shapes: config (at least the derived entries) -> the tensor shapes it needs; checked against
        the file's shapes both ways (derive, then shapes of the derived config).
    config_keys: the exact set of config keys.
    check_config: the config entries the shapes do not determine (ValueError when invalid), or None.
    """

    kind: str
    tensors: Tuple[str, ...]
    derive: Callable[[Shapes], dict]
    shapes: Callable[[Mapping], Shapes]
    config_keys: Tuple[str, ...]
    check_config: Optional[Callable[[Mapping], None]] = None


SCHEMAS: Dict[str, SolverSchema] = {}


def register_schema(schema: SolverSchema) -> SolverSchema:
    """Declare (or replace) the file schema of a solver kind."""
    SCHEMAS[schema.kind] = schema
    return schema


def schema_of(kind: str) -> SolverSchema:
    try:
        return SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"no solver file schema is registered for kind {kind!r} (solvers/file_schemas.py "
                         f"register_schema); known: {sorted(SCHEMAS)}") from None


# -- the schemas of the solver kinds --------------------------------------------------------------------


def _dims(shapes: Shapes, name: str, ndim: int) -> Tuple[int, ...]:
    shape = shapes[name]
    if len(shape) != ndim:
        raise ValueError(f"{name!r} must have {ndim} dimension(s), has shape {shape}")
    return shape


def _bespoke_derive(shapes: Shapes) -> dict:
    steps, order = _dims(shapes, "dt_logits", 2)
    if steps < 1 or order not in (1, 2):
        raise ValueError(f"'dt_logits' of shape {(steps, order)} is not [steps >= 1, order 1 or 2]")
    return {"steps": steps, "order": order}


def _bespoke_shapes(config: Mapping) -> Shapes:
    n, k = config["steps"], config["order"]
    return {"time_logits": (n * k - 1,), "dt_logits": (n, k), "log_s": (n, k), "ds": (n, k)}


BESPOKE_SCHEMA = register_schema(SolverSchema(
    kind="BespokeSolver", tensors=("time_logits", "dt_logits", "log_s", "ds"),
    derive=_bespoke_derive, shapes=_bespoke_shapes, config_keys=("order", "steps"),
))


def _nonstationary_derive(shapes: Shapes) -> dict:
    (n,) = _dims(shapes, "a_delta", 1)
    if n < 1:
        raise ValueError("'a_delta' is empty: a solver makes at least one model evaluation")
    return {"nfe": n}


def _nonstationary_shapes(config: Mapping) -> Shapes:
    n = config["nfe"]
    tri = n * (n + 1) // 2
    return {"time_logits": (n - 1,), "a_delta": (n,), "b_delta": (tri,), "base_times": (n + 1,),
            "base_a": (n,), "base_b": (tri,)}


def _nonstationary_config(config: Mapping) -> None:
    base, refs = config["base"], config["refs"]
    if not isinstance(base, str) or len(base) > 64:
        raise ValueError(f"'base' must be a short string, got {short_repr(base)}")
    if not isinstance(refs, list) or len(refs) != config["nfe"]:
        raise ValueError(f"'refs' must list one entry per evaluation (nfe={short_repr(config['nfe'])}), got {short_repr(refs)}")
    for name in ("time_scale", "coeff_scale"):
        v = config[name]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name!r} must be a positive finite number, got {short_repr(v)}")


NONSTATIONARY_SCHEMA = register_schema(SolverSchema(
    kind="NonStationarySolver",
    tensors=("time_logits", "a_delta", "b_delta", "base_times", "base_a", "base_b"),
    derive=_nonstationary_derive, shapes=_nonstationary_shapes,
    config_keys=("base", "coeff_scale", "nfe", "refs", "time_scale"), check_config=_nonstationary_config,
))
