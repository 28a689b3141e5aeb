"""The results folder that the report is generated from: every file sorted by what wrote it.

Files it reads: ``<machine>.json`` written by ``bespoke-ext bench`` (kind "bespoke_ext.bench"),
``ops_*.md`` (report_ops.py), ``sampling_cpu.json`` (benchmarks/bench_sampling.py),
``training.json`` (benchmarks/bench_training.py) and, in any subfolder, ``sampling_gpu.json``
(benchmarks/gpu/sampling.py) and ``ops_gpu.md`` / ``ops_gpu.json`` (benchmarks/gpu/run.sh). Anything
else is kept in ``Results.other``, so that the report lists it and no result goes unmentioned.

Also the accessors of a quality entry that both the tables and the plots use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .quality import FIXED_METHODS

__all__ = ["Results", "load_results", "read_json", "GENERATED", "FIXED_ORDER", "rows_by_method_nfe",
           "method_labels"]

GENERATED = ("REPORT.md", "readme_performance.md")  # the report's own files: never read back as input
FIXED_ORDER = ("bespoke-ns", "bespoke-rk2", *FIXED_METHODS)  # the quality table's rows, in this order


@dataclass
class Results:
    """What a results folder holds, by kind."""

    folder: Path
    bench: Dict[str, dict] = field(default_factory=dict)        # machine name -> results file content
    ops_tables: List[Path] = field(default_factory=list)         # report_ops.py's markdown tables
    sampling_cpu: Optional[dict] = None                          # bench_sampling.py's summary
    training: Optional[dict] = None                              # bench_training.py's summary
    gpu_sampling: List[Tuple[Path, dict]] = field(default_factory=list)
    gpu_ops: List[Tuple[Path, Optional[dict]]] = field(default_factory=list)  # (ops_gpu.md, its JSON)
    other: List[Path] = field(default_factory=list)


def read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, or None if it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_results(folder) -> Results:
    """Sort every file of ``folder`` (and the GPU files of its subfolders) by what wrote it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist; run `bespoke-ext bench` first")
    res = Results(folder)
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name in GENERATED or path.suffix == ".png":
            continue
        data = read_json(path) if path.suffix == ".json" else None
        if data is not None and data.get("kind") == "bespoke_ext.bench":
            res.bench[data.get("machine_name", path.stem)] = data
        elif path.name.startswith("ops_") and path.suffix == ".md":
            res.ops_tables.append(path)
        elif path.name.startswith("ops_") and path.suffix == ".json":
            continue  # the raw pytest-benchmark file and the JSON twin of an ops_*.md table
        elif path.name == "sampling_cpu.json" and data is not None:
            res.sampling_cpu = data
        elif path.name == "training.json" and data is not None and "models" in data:
            res.training = data
        else:
            res.other.append(path)
    for path in sorted(folder.glob("*/**/sampling_gpu.json")):
        data = read_json(path)
        if data is not None:
            res.gpu_sampling.append((path, data))
    for path in sorted(folder.glob("*/**/ops_gpu.md")):
        res.gpu_ops.append((path, read_json(path.with_suffix(".json"))))
    return res


def rows_by_method_nfe(entry: dict) -> Dict[Tuple[str, int], dict]:
    """A quality entry's rows keyed by (method, NFE)."""
    return {(r["method"], r["nfe"]): r for r in entry.get("rows", [])}


def method_labels(entry: dict) -> Dict[str, str]:
    """Method -> display label of a quality entry's fixed-NFE rows."""
    return {r["method"]: r["label"] for r in entry.get("rows", []) if not r["method"].startswith("dopri5")}
