"""Atomic file writes (write a temporary file, fsync, then rename) and file checksums.

A reader never sees a half-written file: either the old file or the complete new one. os.replace
is atomic on POSIX within one file system, which is why the temporary file lives next to its target.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, IO

__all__ = ["atomic_write", "atomic_write_json", "atomic_save_tensors", "sha256_file"]


def atomic_write(path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path, obj) -> None:
    data = (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_save_tensors(path, tensors, metadata=None) -> None:
    """A safetensors file written atomically, with the permissions of any file the user creates
    (safetensors' own save_file makes it readable by its owner alone)."""
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()
