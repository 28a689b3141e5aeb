"""The solver file format: safetensors tensors plus JSON metadata in the safetensors header.

A solver file is data only; reading one never runs code (no pickle). Header metadata (all strings):

    format          "bespoke_ext.solver"
    format_version  "1"
    kind            the solver class, e.g. "BespokeSolver"
    config          JSON: what the class needs to rebuild the module (e.g. order, steps)
    info            JSON: free metadata (how it was trained, a model tag, ...)
    checksum        "sha256:<hex>" over kind, config, info and every tensor (name, dtype, shape, bytes)

The checksum turns a bit flip anywhere in the tensors or the metadata into a clear refusal instead
of a silently different solver. Truncated, foreign (a safetensors file of something else, a pickle,
random bytes), damaged and newer-version files are refused with a SolverFileError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, Union

import torch
from safetensors.torch import load as _load_safetensors
from safetensors.torch import save as _save_safetensors
from torch import Tensor

__all__ = ["FORMAT", "FORMAT_VERSION", "SolverFile", "SolverFileError", "read_solver_file", "write_solver_file"]

FORMAT = "bespoke_ext.solver"
FORMAT_VERSION = 1
_MAX_HEADER = 1 << 24  # bytes; solver headers are a few KB

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


def _checksum(kind: str, config: str, info: str, tensors: Dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for text in (kind, config, info):
        h.update(text.encode())
        h.update(b"\0")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def write_solver_file(path: PathLike, *, kind: str, config: dict, tensors: Dict[str, Tensor],
                      info: dict) -> None:
    """Write atomically (a temporary file renamed into place), so a crash never leaves half a file."""
    try:
        config_json = json.dumps(config, sort_keys=True, allow_nan=False)
        info_json = json.dumps(info, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"solver metadata must be JSON-serialisable (strings, numbers, lists, dicts): {exc}") from exc
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": config_json,
        "info": info_json,
        "checksum": _checksum(kind, config_json, info_json, tensors),
    }
    data = _save_safetensors(tensors, metadata=metadata)
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_solver_file(path: PathLike, *, kind: str) -> SolverFile:
    """Read and verify a solver file of class ``kind``; SolverFileError for anything else."""
    path = os.fspath(path)

    def refuse(why: str) -> SolverFileError:
        return SolverFileError(f"{path}: {why}")

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise refuse(f"cannot read the file ({exc.strerror or exc})") from exc
    meta = _header_metadata(data, refuse)
    if meta.get("format") != FORMAT:
        raise refuse(f"not a bespoke_ext solver file (a safetensors file without format {FORMAT!r} in its metadata)")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise refuse(f"unreadable format_version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise refuse(f"written in solver format version {version}, newer than this bespoke_ext reads "
                     f"({FORMAT_VERSION}); upgrade bespoke_ext to load it")
    if version < 1:
        raise refuse(f"invalid format_version {version}")
    if meta.get("kind") != kind:
        raise refuse(f"holds a {meta.get('kind')!r}, not a {kind!r}")
    try:
        tensors = _load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types for damaged buffers
        raise refuse(f"damaged or truncated tensor data ({exc})") from exc
    config_json, info_json = meta.get("config", ""), meta.get("info", "")
    if meta.get("checksum") != _checksum(kind, config_json, info_json, tensors):
        raise refuse("checksum mismatch: the file was modified or damaged after it was written")
    try:
        config, info = json.loads(config_json), json.loads(info_json)
    except ValueError as exc:
        raise refuse(f"unreadable JSON metadata ({exc})") from exc
    if not isinstance(config, dict) or not isinstance(info, dict):
        raise refuse("config and info metadata must be JSON objects")
    return SolverFile(kind=kind, version=version, config=config, info=info, tensors=tensors)


def _header_metadata(data: bytes, refuse) -> Dict[str, str]:
    """The safetensors header's __metadata__, read without touching the tensor data.

    Layout: 8-byte little-endian header length N, N bytes of JSON, then the tensor bytes.
    """
    if len(data) < 8:
        raise refuse(f"not a solver file: {len(data)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise refuse(f"not a solver file: no valid safetensors header (declared header length {n}, "
                     f"file length {len(data)}); truncated, or another kind of file")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise refuse("not a solver file, or a damaged one: the safetensors header is not valid JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise refuse(f"not a bespoke_ext solver file (a safetensors file without format {FORMAT!r} in its metadata)")
    return meta
