"""What a Bespoke solver costs to train, with ground truth solved online (the paper's way) and cached
(solved once, read back by Hermite interpolation), against what the model itself cost to pretrain.

Per embedded model: one order-2 solver at NFE 10, trained twice with the demo's settings for that model
(loss, iterations, batch, learning rate, cache size), once per ground-truth mode, each from a fresh cache
folder so that the cached run pays for building its cache. Besides the wall-clock, the training loss of
the first iteration and of the last tenth of the run says whether both modes trained alike. The
pretraining wall-clock comes from the model card (measured when the model was trained, on the machine
the card names).
"""

from __future__ import annotations

import tempfile
from typing import Callable, Sequence

from .quality import QualityModel, settings

__all__ = ["run_training", "GT_MODES", "TRAIN_NFE"]

GT_MODES = ("cached", "online")
TRAIN_NFE = 10


def run_training(models: Sequence[QualityModel], *, quick: bool, seed: int, progress: bool = False,
                 say: Callable[[str], None] = print) -> dict:
    """The training-cost section of the results file."""
    from ..solvers import BespokeSolver
    from ..training import train

    section = {"nfe": TRAIN_NFE, "order": 2, "models": {}, "notes": []}
    for qm in models:
        pretraining = (qm.card.get("training") or {}).get("wall_clock_seconds")
        if pretraining is None:
            section["notes"].append(f"{qm.name}: no pretraining wall-clock in its card (not a trained model); skipped")
            continue
        cfg = settings(qm, quick)
        entry = {"weights_sha256": qm.card["weights"]["sha256"], "pretraining_seconds": pretraining,
                 "pretraining_machine": qm.card["training"].get("machine", {}),
                 "loss": cfg.loss, "iterations": cfg.iterations, "batch_size": cfg.train_batch, "lr": cfg.lr,
                 "runs": {}}
        for gt in GT_MODES:
            say(f"training: {qm.name}, {gt} ground truth, {cfg.iterations} iterations")
            solver = BespokeSolver(TRAIN_NFE // 2, order=2)
            # The demo's training call (demo._train_solvers), with the ground-truth mode varied.
            with tempfile.TemporaryDirectory(prefix="bespoke-bench-train-") as cache_dir:
                train(qm.velocity, solver, shape=qm.shape, iterations=cfg.iterations, batch_size=cfg.train_batch,
                      seed=seed, loss=cfg.loss, lr=cfg.lr, gt=gt, cache_dir=cache_dir, cache_samples=cfg.cache_samples,
                      cache_grid=cfg.cache_grid, cache_shard_size=cfg.cache_samples, gt_group_size=cfg.cache_samples,
                      val_size=cfg.val_size, val_every=cfg.iterations, keep_best=False, progress=progress)
            h = solver.history
            tail = h.loss[-max(1, len(h.loss) // 10):]
            entry["runs"][gt] = {"wall_seconds": h.wall_seconds, "gt_seconds": h.gt_seconds,
                                 "fraction_of_pretraining": h.wall_seconds / pretraining,
                                 "loss_first": h.loss[0], "loss_last": sum(tail) / len(tail)}
        section["models"][qm.name] = entry
    return section
