"""What a Bespoke solver costs to train, against what the model itself cost to pretrain, side by side.

Per model, at NFE 10, each from a fresh cache folder (so a cached run pays for building its cache) and with
the demo's budget for that model and family (``demo.run.train_one``, conditions included):
    - Bespoke order 2 with ground truth solved online (the paper's way) and cached (solved once, read back
      by Hermite interpolation): the training loss of the first iteration and of the last tenth says
      whether both modes trained alike;
    - the non-stationary solver, cached (its fixed set of pairs).
Pretraining is read two ways: the card's wall-clock (measured once, under that day's load) and the same
pretraining loop timed in this run (``models.pretraining_replay.replay``), so the share of pretraining compares
two costs measured at the same machine speed and thread count.
"""

from __future__ import annotations

import tempfile
from typing import Callable, Sequence

from .quality import QualityModel, settings

__all__ = ["run_training", "RUNS", "TRAIN_NFE", "COST_TARGET"]

# (family, ground truth) per row of the section, keyed as the results file keys them
RUNS = {"cached": ("bespoke-rk2", "cached"), "online": ("bespoke-rk2", "online"),
        "nonstationary": ("bespoke-ns", "cached")}
TRAIN_NFE = 10
COST_TARGET = 0.03  # issues 11 and 14: training, ground truth included, at most 3% of pretraining


def run_training(models: Sequence[QualityModel], *, quick: bool, seed: int, progress: bool = False,
                 say: Callable[[str], None] = print) -> dict:
    """The training-cost section of the results file."""
    from ..demo.run import train_one
    from ..models.pretraining_replay import replay

    section = {"nfe": TRAIN_NFE, "order": 2, "target": COST_TARGET, "models": {}, "notes": []}
    for qm in models:
        card_training = qm.card.get("training") or {}
        pretraining = card_training.get("wall_clock_seconds")
        if pretraining is None:
            section["notes"].append(f"{qm.name}: no pretraining wall-clock in its card (not a trained model); skipped")
            continue
        cfg = settings(qm, quick)
        say(f"training: {qm.name}, pretraining replayed at this run's speed")
        now = replay(qm.preset or qm.name, qm.card, seconds=2.0 if quick else 8.0)
        entry = {"weights_sha256": qm.card["weights"]["sha256"], "pretraining_seconds": pretraining,
                 "pretraining_cpu_seconds": card_training.get("cpu_seconds"),
                 "pretraining_machine": card_training.get("machine", {}), "pretraining_now": now,
                 "loss": cfg.loss, "iterations": cfg.iterations, "batch_size": cfg.train_batch, "lr": cfg.lr,
                 "runs": {}}
        for key, (family, gt) in RUNS.items():
            budget = cfg.budget(family)
            say(f"training: {qm.name}, {family}, {gt} ground truth, {budget['iterations']} iterations")
            with tempfile.TemporaryDirectory(prefix="bespoke-bench-train-") as cache_dir:
                solver = train_one(qm, family, TRAIN_NFE, cfg, seed, cache_dir, progress, gt=gt)
            h = solver.history
            tail = h.loss[-max(1, len(h.loss) // 10):]
            entry["runs"][key] = {
                "family": family, "gt": gt, "loss": budget["loss"], "iterations": budget["iterations"],
                "batch_size": budget["batch_size"], "wall_seconds": h.wall_seconds, "gt_seconds": h.gt_seconds,
                "fraction_of_pretraining": h.wall_seconds / pretraining,
                "fraction_of_pretraining_now": h.wall_seconds / now["seconds"] if now else None,
                "loss_first": h.loss[0], "loss_last": sum(tail) / len(tail)}
        section["models"][qm.name] = entry
    return section
