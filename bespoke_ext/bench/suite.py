"""``bespoke-ext bench``: the benchmark suite and its report.

Stages (``--only`` picks some; each replaces its own section of the results file, the others stay; the
per-model stages, quality and training, replace only the models they ran, so ``--models`` refreshes some):
    quality     RMSE / PSNR against ground truth versus NFE on every embedded model and the analytic
                oracle: Euler, midpoint, Heun, RK4, DPM-Solver++(2M), dopri5, diffusers' DPM-Solver++ and
                UniPC, Bespoke order 1 and 2 (quality.py)
    wallclock   seconds per batch at equal NFE on the same noise, against flow_matching, torchdiffeq,
                diffusers and a plain loop, as overhead over the model-evaluation floor (wallclock.py)
    kernels     the fused ops against eager, torch.compile and copy bandwidth (kernels.py)
    training    Bespoke training wall-clock, online and cached ground truth, against pretraining
                (training_cost.py); by default on the default embedded model only (minutes per model)
Writes ``<out>/<machine>.json`` (``<out>``: ./bespoke-bench by default; ``--out benchmarks/results``
refreshes the committed results of a source checkout), then regenerates ``<out>/REPORT.md``, its PNG plots and
``<out>/readme_performance.md`` from every results file in ``<out>`` (report.py).
"""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..compare import torch_threads
from .timing import machine_id, machine_info

__all__ = ["run", "STAGES", "default_out"]

STAGES = ("quality", "wallclock", "kernels", "training")
RESULTS_KIND = "bespoke_ext.bench"


def default_out(quick: bool) -> Path:
    """./bespoke-bench in the current directory; quick runs in its quick/ folder, so that a smoke run never
    overwrites a full run's results. ``--out benchmarks/results`` refreshes the results committed in a
    source checkout."""
    base = Path("bespoke-bench")
    return base / "quick" if quick else base


def run(stages: Sequence[str] = STAGES, *, quick: bool = False, out=None, models: Optional[Sequence[str]] = None,
        solver_dirs: Sequence[str] = (), threads: Optional[int] = None, seed: int = 0, machine: Optional[str] = None,
        report: bool = True, progress: bool = False, say: Optional[Callable[[str], None]] = None) -> Path:
    """The suite as a function; returns the results file's path."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        raise ValueError(f"stages must be some of {STAGES}, got {list(stages)}")
    with torch_threads(threads):  # half the cores by default, as the demo (compare.torch_threads)
        out = Path(out) if out is not None else default_out(quick)
        out.mkdir(parents=True, exist_ok=True)
        return _run(stages, quick, out, models, solver_dirs, seed, machine, report, progress, say)


def _run(stages, quick, out: Path, models, solver_dirs, seed, machine, report, progress, say) -> Path:
    from ..compare import json_safe

    info = machine_info("cpu")
    name = machine or machine_id(info)
    path = out / f"{name}.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    if results.get("kind", RESULTS_KIND) != RESULTS_KIND:
        raise ValueError(f"{path} exists but is not a bespoke_ext.bench results file; "
                         f"choose another --out or --machine")
    results.update(kind=RESULTS_KIND, machine_name=name, machine=info)
    for stage in STAGES:
        if stage not in stages:
            continue
        started = time.perf_counter()
        section = _stage(stage, _models(stage, models), quick=quick, out=out, name=name, solver_dirs=solver_dirs,
                         seed=seed, progress=progress, say=say)
        now = datetime.datetime.now().isoformat(timespec="seconds")
        section.update(quick=quick, threads=torch.get_num_threads(), torch=torch.__version__, measured_at=now,
                       stage_seconds=round(time.perf_counter() - started, 1))
        results[stage] = _merge_models(results.get(stage), section, now)
        # Written after every stage: an interrupted run keeps what it measured.
        path.write_text(json.dumps(json_safe(results), indent=1) + "\n")
        say(f"{stage}: done in {section['stage_seconds']:.0f} s")
    say(f"wrote {path}")
    if report:
        from .report import write_report

        for written in write_report(out):
            say(f"wrote {written}")
    return path


def _models(stage: str, names: Optional[Sequence[str]]):
    """The models a per-model stage runs on: the named ones; by default every embedded model and the oracle
    for quality, and the default embedded model alone for training, whose online ground truth (an adaptive
    solve per iteration) takes minutes per model: ``--only training --models ...`` adds the others."""
    if stage not in ("quality", "training"):
        return None
    from ..models.embedded import DEFAULT_MODEL, list_embedded
    from .quality import quality_models

    if names is None and stage == "training":
        names = [DEFAULT_MODEL] if DEFAULT_MODEL in list_embedded() else list_embedded()[:1]
    return quality_models(names)


def _merge_models(old: Optional[dict], new: dict, now: str) -> dict:
    """Per-model stages (quality, training) keep the models of an earlier run of the same kind (full or
    quick) that this run did not measure, so ``--models X`` adds or refreshes X only; every model entry
    says when it was measured. Earlier entries measured for other weights than the model's current ones
    (a retrained model) are dropped, never reported as current. Models keep the earlier run's order (new
    ones last), so refreshing one model leaves the report's tables in place."""
    from .quality import weights_id

    if "models" not in new:
        return new
    for entry in new["models"].values():
        entry["measured_at"] = now
    if old and old.get("quick") == new["quick"]:
        kept = {k: v for k, v in old.get("models", {}).items()
                if k not in new["models"] and v.get("weights_sha256") == weights_id(k)}
        order = [k for k in old.get("models", {}) if k in kept or k in new["models"]]
        order += [k for k in new["models"] if k not in order]
        new["models"] = {k: new["models"].get(k, kept.get(k)) for k in order}
        new["notes"] = list(dict.fromkeys([*old.get("notes", []), *new.get("notes", [])]))
    return new


def _stage(stage: str, models, *, quick, out: Path, name: str, solver_dirs, seed, progress, say) -> dict:
    if stage == "quality":
        from .quality import run_quality

        return run_quality(models, quick=quick, seed=seed, results_dir=out, solver_dirs=[Path(d) for d in solver_dirs],
                           progress=progress, say=say)
    if stage == "wallclock":
        from .wallclock import run_wallclock

        return run_wallclock(quick=quick, seed=seed, say=say)
    if stage == "kernels":
        from .kernels import run_kernels

        return run_kernels(out, name, quick=quick, say=say)
    from .training_cost import run_training

    return run_training(models, quick=quick, seed=seed, progress=progress, say=say)
