"""Side-by-side timing on a shared, noisy machine: interleaved rounds, medians with spread, machine facts.

Absolute times on these machines move with whatever else runs, so contenders are never timed one
after the other: every round times each contender once, in an order that rotates from round to round,
and all of them see the same load. Reported per contender: median and interquartile range (IQR) of the
rounds, and ratios of medians to a reference measured in the same rounds (the model-evaluation floor,
another library), formed per round and then summarised by their median: contenders of one round run
back to back under the same load, so the per-round ratio cancels load that changes between rounds.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = ["interleaved", "summarize", "compare", "machine_info", "machine_id"]


def interleaved(runners: Mapping[str, Callable[[], object]], *, rounds: int, warmup: int = 1,
                sync: Optional[Callable[[], None]] = None) -> Dict[str, List[float]]:
    """Seconds per call of every runner over ``rounds`` interleaved rounds (after ``warmup`` rounds).

    ``sync`` runs after each call inside the timed region (torch.cuda.synchronize on a GPU, so that a
    call is timed to its last kernel, not to its last launch).
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got rounds={rounds}, warmup={warmup}")
    order = list(runners)
    times: Dict[str, List[float]] = {name: [] for name in order}
    # As timeit does: no cyclic garbage collection inside the timed calls (it would land on whichever
    # contender happens to trigger it); collected once before.
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(warmup + rounds):
            for name in order:
                start = time.perf_counter()
                runners[name]()
                if sync is not None:
                    sync()
                if r >= warmup:
                    times[name].append(time.perf_counter() - start)
            order.append(order.pop(0))
    finally:
        if enabled:
            gc.enable()
    return times


def _quartiles(values: Sequence[float]):
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(seconds: Sequence[float]) -> Dict[str, float]:
    """median, q25, q75, iqr, min (seconds) and the number of rounds."""
    if not seconds:
        raise ValueError("no timings to summarise")
    q1, med, q3 = _quartiles(list(seconds))
    return {"median_s": med, "q25_s": q1, "q75_s": q3, "iqr_s": q3 - q1, "min_s": min(seconds), "rounds": len(seconds)}


def _paired(numerator: Sequence[float], denominator: Sequence[float]) -> Tuple[float, float]:
    """Median and IQR of the per-round ratios numerator / denominator."""
    q1, med, q3 = _quartiles([a / b for a, b in zip(numerator, denominator, strict=True)])
    return med, q3 - q1


def compare(times: Mapping[str, Sequence[float]], floor: str = "floor",
            references: Sequence[str] = ()) -> Dict[str, Dict[str, float]]:
    """summarize() for every contender plus its ratios, all from the same rounds.

    Ratios are paired: formed per round, then the median (and IQR) over the rounds. Round times here are
    bimodal (a round runs up to 2x slower while other processes hold the cores), so a ratio of two
    medians can compare one contender's fast mode with another's slow one; within a round, contenders run
    back to back under the same load, and the per-round ratio cancels it.

    x_floor / x_floor_iqr: contender / floor (1.0 = no overhead; the target is <= 1.10).
    x_floor_of_medians: the contender's median over the floor's median, for comparison.
    <name>_over_self / _iqr, for each reference name: reference / contender (> 1: faster than it).
    """
    out = {name: summarize(ts) for name, ts in times.items()}
    if floor in times:
        for name, ts in times.items():
            out[name]["x_floor"], out[name]["x_floor_iqr"] = _paired(ts, times[floor])
            out[name]["x_floor_of_medians"] = out[name]["median_s"] / out[floor]["median_s"]
    for ref in references:
        if ref in times:
            for name, ts in times.items():
                out[name][f"{ref}_over_self"], out[name][f"{ref}_over_self_iqr"] = _paired(times[ref], ts)
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> Dict[str, object]:
    """The facts a timing table needs next to it: CPU, cores, torch and its threads, the GPU if used."""
    info: Dict[str, object] = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "arch": platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": device,
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def machine_id(info: Mapping[str, object]) -> str:
    """A file-name-safe name for the machine kind, e.g. "cpu-amd-epyc-2c" or "gpu-nvidia-h100-80gb-hbm3"."""
    if info.get("gpu"):
        name = f"gpu-{info['gpu']}"
    else:
        name = f"cpu-{info.get('cpu', 'unknown')}-{info.get('cpu_count', '?')}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
