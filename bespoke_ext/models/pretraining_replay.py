"""A model's pretraining cost at this run's machine speed, for the training-cost comparison.

A model card's pretraining wall-clock was measured once, under whatever else ran on the machine that day:
the cards here read 1.2-4.9x their own CPU-seconds at one thread (mnist_cond's conditional stage 3064 s of
wall-clock for 630 CPU-seconds). A training cost measured today against that number is off by the same
unknown factor. ``replay`` times the preset's own pretraining loop (``models.pretrain.pretrain``: the same
network, data, batch, optimiser, clipping and EMA) for a few iterations now, in this process and at this
thread count, and scales the seconds per iteration to the card's iterations:

    pretraining now = (wall-clock of k replayed iterations / k) x the card's iterations

A model initialised from another (mnist_cond from mnist) adds that model's replay, as its card adds that
model's wall-clock. A short run first warms the process (allocator, oneDNN primitives) and sizes k so
that the timed run lasts about ``seconds``.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Dict

import torch

__all__ = ["replay"]

_FIRST_ITERATIONS = 4


def _loop_seconds(name: str, iterations: int) -> Dict[str, float]:
    """Wall-clock and CPU seconds of ``iterations`` pretraining iterations of preset ``name``: the loop
    alone, as the card counts it (no data loading, held-out loss or export; the card rounds to 0.1 s),
    and the whole call ("call")."""
    from .pretrain import pretrain

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bespoke-pretrain-replay-") as out:
        card = pretrain(name, out_dir=out, iterations=iterations, progress=False)
    tr = card["training"]
    base = (tr.get("initialised_from") or {}).get("wall_clock_seconds", 0.0)
    return {"wall": tr["wall_clock_seconds"] - base, "cpu": tr["cpu_seconds"], "call": time.perf_counter() - started}


def replay(name: str, card: dict, *, seconds: float = 8.0) -> dict:
    """The pretraining of embedded model ``name`` (its ``card``) timed now; see the module docstring.

    Returns ``{"seconds": total now, "cpu_seconds": the same in CPU-seconds, "threads": torch threads,
    "parts": [{model, iterations replayed, card iterations, seconds per iteration}, ...]}``, or None when
    the card names no pretraining iterations (not a trained model).
    """
    from .embedded import read_card
    from .pretrain import PRESETS

    parts, wall, cpu = [], 0.0, 0.0
    while card is not None:
        tr = card.get("training") or {}
        model = card.get("name", name)
        if model not in PRESETS or not tr.get("iterations"):
            return None
        n = int(tr["iterations"])
        k, timed, runs = _FIRST_ITERATIONS, None, 0
        # Grow k until a run after the first (which warms the process) lasts about ``seconds``.
        while True:
            timed, runs = _loop_seconds(model, k), runs + 1
            if runs > 1 and (timed["wall"] >= 0.8 * seconds or k >= n):
                break
            rate = timed["wall"] / k if timed["wall"] >= 0.5 else None
            k = min(n, max(k, math.ceil(seconds / rate)) if rate else 8 * k)
        parts.append({"model": model, "iterations_replayed": k, "card_iterations": int(tr["iterations"]),
                      "seconds_per_iteration": timed["wall"] / k, "cpu_seconds_per_iteration": timed["cpu"] / k})
        wall += timed["wall"] / k * tr["iterations"]
        cpu += timed["cpu"] / k * tr["iterations"]
        base = (tr.get("initialised_from") or {}).get("model")
        card = read_card(base) if base else None
    return {"seconds": wall, "cpu_seconds": cpu, "threads": torch.get_num_threads(), "parts": parts}
