"""The kernel tables: runs the repository's benchmarks/bench_ops.py (pytest-benchmark: the fused ops
against eager PyTorch, torch.compile and the copy-bandwidth floor) and benchmarks/report_ops.py on its
output, each in a subprocess, exactly as a developer would run them by hand.

They live in the source tree, not in the installed package: from an installed copy without the
repository, this stage is skipped with a note.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["benchmarks_dir", "run_kernels", "SIZES", "QUICK_SIZES"]

SIZES = "1e4,1e6,1.6e7"  # elements; the largest (64 MB per fp32 term) is well past the caches
QUICK_SIZES = "1e4,1e6"


def benchmarks_dir() -> Optional[Path]:
    """The repository's benchmarks/ folder next to this package's source, if there is one."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    return folder if (folder / "bench_ops.py").is_file() and (folder / "report_ops.py").is_file() else None


def run_kernels(results_dir: Path, machine: str, *, quick: bool, say: Callable[[str], None] = print) -> dict:
    """The kernels section of the results file: where the tables are and how they were made."""
    folder = benchmarks_dir()
    if folder is None:
        return {"skipped": "benchmarks/bench_ops.py is not next to this package (an installed copy without the "
                           "repository): kernel tables not measured"}
    sizes = QUICK_SIZES if quick else SIZES
    raw = results_dir / f"ops_{machine}_raw.json"
    stem = results_dir / f"ops_{machine}"
    # The same thread count as the rest of the run (torch reads OMP_NUM_THREADS at start-up).
    env = {**os.environ, "BENCH_SIZES": sizes, "BENCH_DEVICE": "cpu", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    started = time.perf_counter()
    say(f"kernels: pytest benchmarks/bench_ops.py (sizes {sizes})")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "bench_ops.py"),
               "--benchmark-only", f"--benchmark-json={raw}"]
    bench = subprocess.run(command, cwd=folder.parent, env=env, capture_output=True, text=True)
    if bench.returncode != 0 or not raw.is_file():
        tail = (bench.stdout + bench.stderr)[-2000:]
        raise RuntimeError(f"benchmarks/bench_ops.py failed (exit {bench.returncode}):\n{tail}")
    report = subprocess.run([sys.executable, str(folder / "report_ops.py"), str(raw), "--out", str(stem)],
                            cwd=folder.parent, capture_output=True, text=True)
    if report.returncode != 0:
        raise RuntimeError(f"benchmarks/report_ops.py failed (exit {report.returncode}):\n{report.stderr[-2000:]}")
    return {"sizes": sizes, "raw": raw.name, "table": stem.with_suffix(".md").name,
            "json": stem.with_suffix(".json").name, "seconds": round(time.perf_counter() - started, 1)}
