"""The solver file format: safetensors tensors plus JSON metadata in the safetensors header.

A solver file is data only; reading one never runs code (no pickle). Header metadata (all strings):

    format          "bespoke_ext.solver"
    format_version  "1"
    kind            the solver class, e.g. "BespokeSolver"
    config          JSON: what the class needs to rebuild the module (e.g. order, steps)
    info            JSON: free metadata (how it was trained, a model tag, ...)
    checksum        "sha256:<hex>" over kind, config, info and every tensor (name, dtype, shape, bytes)

What makes loading safe is that it is data only and that everything is checked before it is used,
not the checksum. **The checksum is not a key**: anyone can compute a valid one for a file of
their own making, so it proves nothing about who wrote a file. It detects damage (a flipped bit, a
truncated copy, an edited header) and turns it into a clear refusal instead of a silently
different solver. A deliberately crafted file passes it, and then meets the same checks as any
other file:

- Sizes are capped before anything is read or allocated: the file (``MAX_FILE_BYTES``), the header
  (``MAX_HEADER_BYTES``), the number of tensors (``MAX_TENSORS``), their dimensions (``MAX_DIMS``)
  and their elements together (``MAX_ELEMENTS``). Only the header is read before the checks; the
  tensor bytes are checksummed in 1 MiB chunks and read only when the checksum matches, so a file
  that is refused costs at most its header in memory.
- Each solver kind declares a :class:`SolverSchema`: its tensor names, the config it derives from
  their shapes and the shapes a config implies. The reader checks the header's tensor names, dtypes,
  shapes and byte ranges, derives the config from the shapes and compares it with the header's
  config, all before reading a tensor byte; a file claiming ``steps = 10**9`` next to the tensors of
  a 5-step solver, or shapes its bytes cannot hold, is refused there. ``write_solver_file(...,
  check_schema=True)`` applies the same schema, so a file written reads back.
- Every parse error (invalid UTF-8, invalid or deeply nested JSON, a RecursionError included,
  integers too long to parse, a truncated read, ...) becomes a :class:`SolverFileError` naming the
  file, as do damaged, truncated, foreign (another safetensors file, a pickle, random bytes) and
  newer-version files. Tensors must be finite floating-point values.

A new solver kind with a file registers its schema (``register_schema``) and calls
``read_solver_file(path, kind=...)`` / ``write_solver_file(...)``: the rules above then apply to it
unchanged. ``SCHEMAS`` holds BespokeSolver's and NonStationarySolver's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from typing import Dict, Mapping, Tuple, Union

import torch
from safetensors.torch import save as _save_safetensors
from torch import Tensor

from .file_schemas import SCHEMAS, Shapes, SolverSchema, clip, register_schema, schema_of, short_repr

__all__ = [
    "FORMAT", "FORMAT_VERSION", "SolverFile", "SolverFileError", "SolverSchema", "SCHEMAS", "register_schema",
    "read_solver_file", "write_solver_file", "MAX_FILE_BYTES", "MAX_HEADER_BYTES", "MAX_TENSORS", "MAX_DIMS",
    "MAX_ELEMENTS",
]

FORMAT = "bespoke_ext.solver"
FORMAT_VERSION = 1

MAX_HEADER_BYTES = 1 << 18  # 256 KiB; solver headers are 1-2 KB (the info metadata is most of it)
MAX_TENSORS = 32
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 22  # all tensors together: 32 MiB of float64 (a 500000-step BespokeSolver)
# safetensors dtype -> (torch dtype, bytes per element); solver parameters are floating point.
_DTYPES = {"F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
           "BF16": (torch.bfloat16, 2)}
MAX_FILE_BYTES = 8 + MAX_HEADER_BYTES + 8 * MAX_ELEMENTS
_CHUNK = 1 << 20

PathLike = Union[str, os.PathLike]


class SolverFileError(ValueError):
    """A file that is not a readable solver file of this version."""


@dataclass(frozen=True)
class SolverFile:
    kind: str
    version: int
    config: dict
    info: dict
    tensors: Dict[str, Tensor]


# -- checks shared by the writer and the reader ------------------------------------------------------------


def _check_layout(schema: SolverSchema, config, shapes: Shapes) -> None:
    """Tensor names and shapes, the config they imply and the header's config: ValueError if any
    disagree. Uses only the shapes (no tensor data)."""
    if set(shapes) != set(schema.tensors):
        raise ValueError(f"tensors {sorted(shapes)} are not those of a {schema.kind} ({sorted(schema.tensors)})")
    try:
        derived = schema.derive(shapes)
        expected = schema.shapes(derived)
    except ValueError as exc:
        raise ValueError(f"tensor shapes {_shapes_text(shapes)} are not those of any {schema.kind} ({exc})") from None
    if expected != shapes:
        raise ValueError(f"tensor shapes {_shapes_text(shapes)} do not match a {schema.kind} with "
                         f"{_config_text(derived)}, which needs {_shapes_text(expected)}")
    if not isinstance(config, dict):
        raise ValueError(f"the config must be a JSON object, got {short_repr(config)}")
    if set(config) != set(schema.config_keys):
        raise ValueError(f"config keys {sorted(config)[:16]} are not those of a {schema.kind} "
                         f"({sorted(schema.config_keys)})")
    if schema.check_config is not None:
        schema.check_config(config)
    wrong = {k: config[k] for k, v in derived.items() if type(config[k]) is not type(v) or config[k] != v}
    if wrong:
        raise ValueError(f"config {_config_text(wrong)} does not match the tensor shapes, which are those of a "
                         f"{schema.kind} with {_config_text(derived)}")


def _elements(shape) -> int:
    return math.prod(shape)


# -- writing ----------------------------------------------------------------------------------------------------


def _checksum(kind: str, config: str, info: str, tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    _checksum_head(h, kind, config, info)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(_tensor_tag(name, t.dtype, tuple(t.shape)))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def _checksum_head(h, kind: str, config: str, info: str) -> None:
    for text in (kind, config, info):
        h.update(text.encode())
        h.update(b"\0")


def _tensor_tag(name: str, dtype: torch.dtype, shape: Tuple[int, ...]) -> bytes:
    return f"{name}\0{dtype}\0{shape}\0".encode()


def write_solver_file(path: PathLike, *, kind: str, config: dict, tensors: Dict[str, Tensor],
                      info: dict, check_schema: bool = False) -> None:
    """Write atomically (a temporary file renamed into place), so a crash never leaves half a file.

    ``kind`` must have a registered schema. With ``check_schema`` the file must also satisfy what
    the reader checks (the schema's tensor names, shapes and config, finite float tensors, the size
    caps): a ValueError otherwise, before anything is written, so the file reads back. (Without it,
    tests can write files the reader refuses.)
    """
    schema = schema_of(kind)
    try:
        config_json = json.dumps(config, sort_keys=True, allow_nan=False)
        info_json = json.dumps(info, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"solver metadata must be JSON-serialisable (strings, numbers, lists, dicts): {exc}") from exc
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if check_schema:
        for name, t in tensors.items():
            if t.dtype not in {d for d, _ in _DTYPES.values()}:
                raise ValueError(f"tensor {name!r} must be float16/bfloat16/float32/float64, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensor {name!r} has {int((~torch.isfinite(t)).sum())} non-finite values (NaN or inf) "
                                 f"of {t.numel()}: a solver file holds finite parameters only (was training diverging?)")
        _check_layout(schema, json.loads(config_json), {k: tuple(v.shape) for k, v in tensors.items()})
        _check_sizes({k: tuple(v.shape) for k, v in tensors.items()})
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": config_json,
        "info": info_json,
        "checksum": _checksum(kind, config_json, info_json, tensors),
    }
    data = _save_safetensors(tensors, metadata=metadata)
    header_len = struct.unpack("<Q", data[:8])[0]
    if header_len > MAX_HEADER_BYTES:
        raise ValueError(f"the solver file's header would be {header_len} bytes, more than readers accept "
                         f"({MAX_HEADER_BYTES}); keep the metadata smaller")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write the solver file {path}: its folder {folder} does not exist")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)   # atomic: a reader sees the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _check_sizes(shapes: Shapes) -> None:
    if len(shapes) > MAX_TENSORS:
        raise ValueError(f"{len(shapes)} tensors, more than a solver file may hold ({MAX_TENSORS})")
    total = 0
    for name, shape in shapes.items():
        if len(shape) > MAX_DIMS:
            raise ValueError(f"tensor {name!r} has {len(shape)} dimensions, more than {MAX_DIMS}")
        total += _elements(shape)
    if total > MAX_ELEMENTS:
        raise ValueError(f"{total} tensor elements, more than a solver file may hold ({MAX_ELEMENTS})")


# -- reading ----------------------------------------------------------------------------------------------------


def read_solver_file(path: PathLike, *, kind: str) -> SolverFile:
    """Read and verify a solver file of class ``kind``; SolverFileError naming the file for
    anything else (module docstring: what is checked, and in which order)."""
    schema = schema_of(kind)
    path = os.fspath(path)
    try:
        return _read(path, schema)
    except SolverFileError:
        raise
    except OSError as exc:
        raise SolverFileError(f"{path}: cannot read the file ({exc.strerror or exc})") from exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError, OverflowError,
            MemoryError, struct.error, RuntimeError) as exc:
        # UnicodeDecodeError and json's errors are ValueErrors; nesting too deep is a RecursionError
        raise SolverFileError(f"{path}: not a readable solver file ({type(exc).__name__}: {clip(str(exc), 200)})") from exc


def _read(path: str, schema: SolverSchema) -> SolverFile:
    def refuse(why: str) -> SolverFileError:
        return SolverFileError(f"{path}: {why}")

    if not stat.S_ISREG(os.stat(path).st_mode):   # before open: opening a FIFO would block
        raise refuse("not a regular file")
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise refuse("not a regular file")
        size = st.st_size
        if size < 8:
            raise refuse(f"not a solver file: {size} bytes, too short for a safetensors header")
        if size > MAX_FILE_BYTES:
            raise refuse(f"not a solver file: {size} bytes, more than a solver file may have ({MAX_FILE_BYTES})")
        (n,) = struct.unpack("<Q", _read_exactly(f, 8, refuse))
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise refuse(f"not a solver file: no valid safetensors header (declared header length {n}, "
                         f"file length {size}, at most {MAX_HEADER_BYTES}); truncated, or another kind of file")
        try:
            header = _json(_read_exactly(f, n, refuse).decode("utf-8"))
        except (ValueError, RecursionError):
            raise refuse("not a solver file, or a damaged one: the safetensors header is not valid JSON "
                         "(or nested too deeply)") from None
        if not isinstance(header, dict):
            raise refuse("not a solver file: the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise refuse(f"not a bespoke_ext solver file (a safetensors file without format {FORMAT!r} in its metadata)")
        version = _check_meta(meta, schema.kind, refuse)
        entries = _tensor_entries(header, size - 8 - n, refuse)
        config = _metadata_json(meta, "config", refuse)
        try:
            _check_layout(schema, config, {name: shape for name, (_, shape, _, _) in entries.items()})
        except ValueError as exc:
            raise refuse(str(exc)) from None
        info = _metadata_json(meta, "info", refuse)
        if not isinstance(info, dict):
            raise refuse("the info metadata must be a JSON object")
        data_start = 8 + n
        if meta.get("checksum") != _stream_checksum(f, data_start, schema.kind, meta, entries):
            raise refuse("checksum mismatch: the file was modified or damaged after it was written")
        tensors = {name: _read_tensor(f, data_start, entry, refuse) for name, entry in entries.items()}
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise refuse(f"tensor {name!r} is not a finite float tensor (NaN or infinity)")
    return SolverFile(kind=schema.kind, version=version, config=config, info=info, tensors=tensors)


def _check_meta(meta: dict, kind: str, refuse) -> int:
    if meta.get("format") != FORMAT:
        raise refuse(f"not a bespoke_ext solver file (a safetensors file without format {FORMAT!r} in its metadata)")
    text = meta.get("format_version", "")
    if not (0 < len(text) <= 6 and text.isdigit() and text.isascii()):
        raise refuse(f"unreadable format_version {short_repr(text)}")
    version = int(text)
    if version > FORMAT_VERSION:
        raise refuse(f"written in solver format version {version}, newer than this bespoke_ext reads "
                     f"({FORMAT_VERSION}); upgrade bespoke_ext to load it")
    if version < 1:
        raise refuse(f"invalid format_version {version}")
    if meta.get("kind") != kind:
        raise refuse(f"holds a {short_repr(meta.get('kind'))}, not a {kind!r}")
    return version


Entry = Tuple[str, Tuple[int, ...], int, int]  # safetensors dtype, shape, begin, end (in the data region)


def _tensor_entries(header: dict, data_len: int, refuse) -> Dict[str, Entry]:
    """The tensors' dtypes, shapes and byte ranges, checked against the caps and the file's size."""
    if len(header) > MAX_TENSORS:
        raise refuse(f"{len(header)} tensors, more than a solver file may hold ({MAX_TENSORS})")
    entries: Dict[str, Entry] = {}
    total = 0
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise refuse(f"tensor {short_repr(name)}: not a safetensors tensor entry")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if dtype not in _DTYPES:
            raise refuse(f"tensor {short_repr(name)} has dtype {short_repr(dtype)}; solver parameters are floating point, "
                         f"one of {sorted(_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_index(d) for d in shape):
            raise refuse(f"tensor {short_repr(name)}: shape {short_repr(shape)} is not a list of at most {MAX_DIMS} "
                         f"non-negative integers")
        total += _elements(shape)
        if total > MAX_ELEMENTS:
            raise refuse(f"tensor {short_repr(name)}: more than {MAX_ELEMENTS} tensor elements in all, more than a "
                         f"solver file may hold")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)):
            raise refuse(f"tensor {short_repr(name)}: data_offsets {short_repr(offsets)} are not two non-negative integers")
        begin, end = offsets
        if end - begin != _elements(shape) * _DTYPES[dtype][1]:
            raise refuse(f"tensor {short_repr(name)}: {end - begin} bytes for shape {tuple(shape)} of {dtype}; damaged header")
        entries[name] = (dtype, tuple(shape), begin, end)
    position = 0  # safetensors lays the tensors out back to back, in offset order, filling the data
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if begin != position:
            raise refuse(f"tensor {short_repr(name)}: data at byte {begin}, expected {position}; damaged header")
        position = end
    if position != data_len:
        raise refuse(f"truncated or damaged tensor data: the header describes {position} bytes, the file holds {data_len}")
    return entries


def _is_index(v) -> bool:
    return type(v) is int and 0 <= v <= 1 << 62


def _metadata_json(meta: dict, key: str, refuse):
    try:
        return _json(meta.get(key, ""))
    except (ValueError, RecursionError):
        raise refuse(f"unreadable JSON {key} metadata (invalid, or nested too deeply)") from None


def _stream_checksum(f, data_start: int, kind: str, meta: dict, entries: Dict[str, Entry]) -> str:
    """The checksum of the file as written, reading the tensor bytes in chunks (nothing kept)."""
    h = hashlib.sha256()
    _checksum_head(h, kind, meta.get("config", ""), meta.get("info", ""))
    for name in sorted(entries):
        dtype, shape, begin, end = entries[name]
        h.update(_tensor_tag(name, _DTYPES[dtype][0], shape))
        f.seek(data_start + begin)
        left = end - begin
        while left:
            chunk = f.read(min(left, _CHUNK))
            if not chunk:
                raise SolverFileError(f"{f.name}: truncated tensor data")
            h.update(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest()


def _read_tensor(f, data_start: int, entry: Entry, refuse) -> Tensor:
    dtype, shape, begin, end = entry
    torch_dtype = _DTYPES[dtype][0]
    if end == begin:
        return torch.empty(shape, dtype=torch_dtype)
    f.seek(data_start + begin)
    buf = bytearray(_read_exactly(f, end - begin, refuse))
    # safetensors stores little-endian; so do the hosts this runs on (x86-64, aarch64)
    return torch.frombuffer(buf, dtype=torch_dtype).reshape(shape)


def _read_exactly(f, count: int, refuse) -> bytes:
    data = f.read(count)
    if len(data) != count:
        raise refuse(f"truncated: expected {count} more bytes, found {len(data)}")
    return data


def _json(text: str):
    """json.loads without NaN / Infinity and without duplicate keys (a RecursionError for deep
    nesting is the caller's to turn into a refusal)."""
    return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_duplicates)


def _no_constant(name: str):
    raise ValueError(f"{name} is not allowed in solver metadata")


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys")
    return out


def _shapes_text(shapes: Mapping) -> str:
    return "{" + ", ".join(f"{k}: {tuple(v)}" for k, v in sorted(shapes.items())) + "}"


def _config_text(config: Mapping) -> str:
    return ", ".join(f"{k}={short_repr(v)}" for k, v in sorted(config.items()))
