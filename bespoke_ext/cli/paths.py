"""Output paths checked before the work that fills them: a long training or sampling run must not end
in an error about the file it was meant to write (a folder given as a file, a read-only folder)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def writable_file(path: Path, flag: str) -> Path:
    """``path`` as a file to be written: its folder made and tried with a temporary file; an existing
    folder at ``path`` itself is refused. ValueError names the flag."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name (e.g. {path / 'out.safetensors'})")
    _try_folder(path.parent, flag, path)
    return path


def writable_dir(path: Path, flag: str) -> Path:
    """``path`` as a folder to be written into: made if missing, tried with a temporary file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder")
    _try_folder(path, flag, path)
    return path


def _try_folder(folder: Path, flag: str, path: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write into {folder} ({exc.strerror or exc})") from None
