"""The kernel tables: runs the repository's benchmarks/bench_ops.py (pytest-benchmark: the fused ops
against eager PyTorch, torch.compile and the copy-bandwidth floor) in this process through
``pytest.main``, then report_ops.write_ops_report on the JSON it wrote (ops_<machine>.md / .json).

No subprocess: bench_ops.py sets each case's thread count itself (torch.set_num_threads, restored after
the case), so nothing has to be fixed before torch starts. Its settings (BENCH_DEVICE, BENCH_FLAT_SIZES,
...) are read from the environment when pytest imports it, so they are set around the run, and the
modules pytest imported from benchmarks/ are dropped after it, so that a second run imports them afresh.

bench_ops.py lives in the source tree, not in the installed package: from an installed copy without the
repository, or without pytest-benchmark (the bench extra), this stage is skipped with a note.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

from .report_ops import write_ops_report

__all__ = ["benchmarks_dir", "run_bench_ops", "run_kernels", "SIZES", "QUICK_SIZES"]

SIZES = "1e4,1e6,4.2e6,1.7e7"  # flat sweep, elements; the largest (68 MB per fp32 term) is well past the caches
QUICK_SIZES = "1e4,1e6"


def benchmarks_dir() -> Optional[Path]:
    """The repository's benchmarks/ folder next to this package's source, if there is one."""
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    return folder if (folder / "bench_ops.py").is_file() else None


def run_bench_ops(bench_file: Path, raw: Path, env: Dict[str, str], args: Sequence[str] = ()) -> Tuple[int, str]:
    """pytest-benchmark on ``bench_file`` in this process, its JSON written to ``raw``, with ``env`` set
    for the run (``args``: more pytest arguments, e.g. ``-k``). Returns pytest's exit code and its output
    (stdout and stderr, kept out of the terminal: the caller shows its tail if the run fails)."""
    import pytest

    folder = Path(bench_file).resolve().parent
    saved = {name: os.environ.get(name) for name in env}
    before = set(sys.modules)
    output = io.StringIO()
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            # importlib mode: sys.path stays as it is; the rootdir and its pytest settings are the repository's
            code = pytest.main(["-q", "-p", "no:cacheprovider", "--import-mode=importlib", f"--rootdir={folder.parent}",
                                str(bench_file), "--benchmark-only", f"--benchmark-json={raw}", *args])
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for name in set(sys.modules) - before:
            if name.split(".")[0] == folder.name:  # benchmarks.bench_ops, benchmarks.conftest, their package
                del sys.modules[name]
    return int(code), output.getvalue()


def run_kernels(results_dir: Path, machine: str, *, quick: bool, say: Callable[[str], None] = print) -> dict:
    """The kernels section of the results file: where the tables are and how they were made."""
    folder = benchmarks_dir()
    if folder is None:
        return {"skipped": "benchmarks/bench_ops.py is not next to this package (an installed copy without the "
                           "repository): kernel tables not measured"}
    if importlib.util.find_spec("pytest_benchmark") is None:
        return {"skipped": "pytest-benchmark is not installed (pip install 'bespoke_ext[bench]'): kernel tables "
                           "not measured"}
    sizes = QUICK_SIZES if quick else SIZES
    raw = results_dir / f"ops_{machine}_raw.json"
    stem = results_dir / f"ops_{machine}"
    started = time.perf_counter()
    say(f"kernels: pytest benchmarks/bench_ops.py (flat sizes {sizes})")
    code, output = run_bench_ops(folder / "bench_ops.py", raw, {"BENCH_FLAT_SIZES": sizes, "BENCH_DEVICE": "cpu"})
    if code != 0 or not raw.is_file():
        raise RuntimeError(f"benchmarks/bench_ops.py failed (exit {code}):\n{output[-2000:]}")
    md, js, _ = write_ops_report(raw, stem)
    return {"sizes": sizes, "raw": raw.name, "table": md.name, "json": js.name,
            "seconds": round(time.perf_counter() - started, 1)}
