"""Loading the compiled extension (``bespoke_ext/_C*.so``), checked against the torch imported.

A C++ torch extension is tied to the torch it was compiled against: installing another package
that pulls in a newer torch leaves the library built for the old one, and loading it then fails
with an undefined symbol or, worse, crashes the process. So the build records the torch it used,
and the import compares that record with the torch imported *before* loading the library:

- a build record ``<library>.build.json`` next to the library (written by the build,
  ``write_build_record``): torch's version and git revision, its CUDA version and C++ ABI, and the
  library's size and SHA-256 (a record that does not describe this very file is ignored, so a
  library rebuilt some other way is never refused because of a stale record);
- a different torch: an ImportError naming both versions and the command that rebuilds the library
  for the torch imported, without loading it;
- no record (a build from before the record existed, or one that wrote none): the library is
  loaded, and a failure to load it becomes an ImportError with the same rebuild command.

``from .extension import _C`` (ops.py) runs the check and loads the library. This file imports
nothing from the package, so setup.py can load it by path to write the record.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from typing import Optional

import torch

__all__ = ["LIBRARY", "load_extension", "check_build", "read_build_record", "write_build_record",
           "build_record_path", "rebuild_command"]

LIBRARY = "bespoke_ext._C"
_RECORD_VERSION = 1


def build_record_path(library: str) -> str:
    return os.fspath(library) + ".build.json"


def _torch_build() -> dict:
    return {
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", None),
        "cuda": torch.version.cuda,
        "cxx11_abi": bool(torch.compiled_with_cxx11_abi()),
    }


def _library_identity(library: str) -> dict:
    h = hashlib.sha256()
    with open(library, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"library": os.path.basename(library), "size": os.path.getsize(library), "sha256": h.hexdigest()}


def write_build_record(library: str) -> str:
    """Record the torch imported now (the build's) for the built ``library``; returns the record's
    path. Called by setup.py after the extension is built."""
    library = os.fspath(library)
    record = {"record_version": _RECORD_VERSION, **_torch_build(), **_library_identity(library),
              "python": sys.version.split()[0]}
    path = build_record_path(library)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_build_record(library: str) -> Optional[dict]:
    """The build record of ``library``, or None when there is none, it is unreadable, or it
    describes another file (the library was rebuilt without one)."""
    try:
        with open(build_record_path(library)) as f:
            record = json.load(f)
        if not isinstance(record, dict) or not isinstance(record.get("torch"), str):
            return None
        identity = _library_identity(library)
    except (OSError, ValueError, RecursionError):
        return None
    if any(record.get(k) != v for k, v in identity.items()):
        return None
    return record


def rebuild_command(library: Optional[str] = None) -> str:
    """The command that rebuilds the library for the torch imported: an editable install of the
    source checkout it lives in (``pip install --no-build-isolation -e``), else a reinstall."""
    python = sys.executable or "python"
    package_dir = os.path.dirname(os.path.abspath(library)) if library else os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package_dir)
    if os.path.exists(os.path.join(root, "setup.py")) and os.path.exists(os.path.join(root, "pyproject.toml")):
        return f"{python} -m pip install --no-build-isolation --no-deps -e {root}"
    return (f"{python} -m pip install --no-build-isolation --no-deps --force-reinstall --no-binary bespoke_ext "
            f"<bespoke_ext source checkout or sdist>")


def check_build(library: str, runtime: Optional[dict] = None) -> Optional[dict]:
    """ImportError if ``library``'s build record names another torch than the one imported
    (``runtime``: the imported torch's description, for tests); returns the record (None: none)."""
    record = read_build_record(library)
    if record is None:
        return None
    now = runtime or _torch_build()
    # cuda is None for CPU builds, a real difference; the others may be missing from older records
    differs = [k for k in ("torch_git", "cxx11_abi")
               if record.get(k) is not None and now.get(k) is not None and record.get(k) != now.get(k)]
    if "cuda" in record and record.get("cuda") != now.get("cuda"):
        differs.insert(0, "cuda")
    if record["torch"] != now["torch"] or differs:
        detail = ", ".join(f"{k}: built {record.get(k)!r}, now {now.get(k)!r}" for k in differs)
        if record["torch"] != now["torch"]:
            what = (f"was built against torch {record['torch']}, but torch {now['torch']} is imported"
                    + (f" ({detail})" if detail else ""))
        else:
            what = f"was built against another build of torch {now['torch']} ({detail})"
        raise ImportError(
            f"bespoke_ext's compiled extension {library} {what}; a C++ extension only works with the torch it "
            f"was built against. Rebuild it for this torch:\n    {rebuild_command(library)}"
        )
    return record


def load_extension(name: str = LIBRARY, origin: Optional[str] = None):
    """Check the build record, then load the library (``origin``: a file to load instead of the
    installed one, for tests). ImportError with the rebuild command when it is missing, was built
    for another torch or fails to load."""
    if origin is None:
        spec = importlib.util.find_spec(name)  # locates the file; loads nothing
        if spec is None or not spec.origin or not os.path.exists(spec.origin):
            raise ImportError(f"bespoke_ext's compiled extension ({name}, bespoke_ext/_C*.so) is not built. "
                              f"Build it:\n    {rebuild_command()}")
        library = spec.origin
    else:
        library = os.fspath(origin)
    record = check_build(library)
    try:
        if origin is None:
            return importlib.import_module(name)
        loader = importlib.machinery.ExtensionFileLoader(name, library)
        spec = importlib.util.spec_from_file_location(name, library, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        return module
    except (ImportError, OSError) as exc:
        built = (f"built against torch {record['torch']}" if record is not None
                 else "no build record, so the torch it was built against is unknown")
        raise ImportError(
            f"bespoke_ext's compiled extension {library} could not be loaded ({exc}); {built}, torch "
            f"{torch.__version__} is imported. If torch changed since it was built, rebuild it:\n    "
            f"{rebuild_command(library)}"
        ) from exc


def __getattr__(attr: str):
    # ``from .extension import _C``: checked and loaded on first use, not when setup.py loads this file
    if attr == "_C":
        module = load_extension()
        globals()["_C"] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
