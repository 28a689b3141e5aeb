"""The record of a training run, attached to the returned solver as ``solver.history``.

Per iteration: ``loss`` (the training loss of that iteration's global batch) and ``lr``.
Per validation (iteration 0 = the solver as given, usually the identity = plain Euler / midpoint, then
every ``val_every`` iterations and the last): ``val_iteration``, ``val_rmse``, ``val_psnr`` (against
ground truth x(1)), ``val_times`` (the solver's time grid then) and ``val_wall`` (seconds since the
run started, summed over resumed runs). Summary: ``best_iteration``/``best_rmse`` (the solver returned
when keep_best), ``base_rmse`` (iteration 0), ``gt_seconds`` (ground-truth work: cache build or online
solves, the validation set's solve), ``wall_seconds`` (whole run), ``nfe``. ``skipped_iterations``: the
iterations (1-based, like ``val_iteration``) whose loss or gradient was not finite and whose step was therefore not applied;
``skipped`` is their count. With the least-squares start (TrainOptions.fit_start) iteration 0 is validated
twice, the solver as given and then fitted (``fitted_rmse``); ``fit_seconds`` is the fit's own time (its
ground-truth reads are in ``gt_seconds``), ``fit_warp`` the p of the time grid it chose (times as given ** p).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

__all__ = ["TrainHistory", "plot_history"]


@dataclass
class TrainHistory:
    loss: List[float] = field(default_factory=list)
    lr: List[float] = field(default_factory=list)
    val_iteration: List[int] = field(default_factory=list)
    val_rmse: List[float] = field(default_factory=list)
    val_psnr: List[float] = field(default_factory=list)
    val_times: List[List[float]] = field(default_factory=list)
    val_wall: List[float] = field(default_factory=list)
    best_iteration: Optional[int] = None
    best_rmse: float = math.inf
    gt_seconds: float = 0.0
    wall_seconds: float = 0.0
    nfe: int = 0
    options: Dict = field(default_factory=dict)
    skipped_iterations: List[int] = field(default_factory=list)
    fit_seconds: float = 0.0
    fit_warp: Optional[float] = None

    @property
    def skipped(self) -> int:
        """Optimizer steps skipped because the loss or a gradient was not finite."""
        return len(self.skipped_iterations)

    @property
    def base_rmse(self) -> Optional[float]:
        """Validation RMSE at iteration 0 (the solver as given: the base method for a fresh solver)."""
        return self.val_rmse[0] if self.val_iteration and self.val_iteration[0] == 0 else None

    @property
    def fitted_rmse(self) -> Optional[float]:
        """Validation RMSE of the least-squares start (the second validation at iteration 0), if there was one."""
        return self.val_rmse[1] if self.val_iteration[:2] == [0, 0] else None

    @property
    def iterations(self) -> int:
        return len(self.loss)

    def to_json(self) -> str:
        d = asdict(self)
        d["best_rmse"] = None if math.isinf(self.best_rmse) else self.best_rmse
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "TrainHistory":
        d = json.loads(text)
        d["best_rmse"] = math.inf if d.get("best_rmse") is None else d["best_rmse"]
        return cls(**d)

    def warn_if_start_kept(self, lr: float) -> None:
        """Warn when no iteration improved on the start (keep_best then hands it back unchanged, which would
        otherwise pass for a trained result; a learning rate too large for this NFE, typically)."""
        if self.best_iteration == 0 and self.val_iteration and self.val_iteration[-1] > 0:
            # the least-squares start, when it was the best, can sit at the ground truth's own accuracy
            fitted = self.best_rmse == self.fitted_rmse
            start = "the least-squares start" if fitted else "the starting solver"
            warnings.warn(f"bespoke_ext.train: no iteration improved on {start}'s validation RMSE "
                          f"({self.best_rmse:.4g}; after {self.val_iteration[-1]} iterations {self.val_rmse[-1]:.4g}), "
                          f"so keep_best returns it unchanged; try a lower lr (this run: {lr:g}) or more iterations"
                          + (", or none (iterations=0 only fits)" if fitted else ""), RuntimeWarning, stacklevel=4)

    def truncate(self, iterations: int, validations: int) -> None:
        """Drop records beyond ``iterations`` losses and ``validations`` validations (interrupt rollback)."""
        del self.loss[iterations:], self.lr[iterations:]
        self.skipped_iterations[:] = [i for i in self.skipped_iterations if i <= iterations]
        for name in ("val_iteration", "val_rmse", "val_psnr", "val_times", "val_wall"):
            del getattr(self, name)[validations:]

    def summary(self) -> Dict:
        """Small JSON-safe dict for solver-file metadata."""
        return {"iterations": self.iterations, "best_iteration": self.best_iteration,
                "best_val_rmse": None if math.isinf(self.best_rmse) else self.best_rmse,
                "base_val_rmse": self.base_rmse, "fitted_val_rmse": self.fitted_rmse, "final_loss": self.loss[-1] if self.loss else None,
                "skipped_steps": self.skipped, "fit_seconds": round(self.fit_seconds, 3),
                "wall_seconds": round(self.wall_seconds, 3), "gt_seconds": round(self.gt_seconds, 3)}


def plot_history(history: TrainHistory, path, title: str = "") -> None:
    """Learning curve PNG: training loss per iteration (log scale; linear for a loss that is already a log,
    such as log_mse, which is negative once the mean squared error is below 1) and validation RMSE (log scale)."""
    from ..figures import pyplot

    plt = pyplot()
    fig, ax1 = plt.subplots(figsize=(7, 4.2), dpi=110)
    if history.loss:
        ax1.plot(range(1, len(history.loss) + 1), history.loss, color="tab:blue", lw=1, alpha=0.8, label="training loss")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("training loss", color="tab:blue")
    if history.loss and min(history.loss) > 0:
        ax1.set_yscale("log")
    ax2 = ax1.twinx()
    if history.val_rmse:
        ax2.plot(history.val_iteration, history.val_rmse, "o-", color="tab:red", ms=3, label="validation RMSE")
        if history.base_rmse is not None:
            ax2.axhline(history.base_rmse, color="tab:gray", ls="--", lw=1, label="base method (iteration 0)")
        if history.fitted_rmse is not None:
            ax2.axhline(history.fitted_rmse, color="tab:green", ls=":", lw=1, label="least-squares start")
        if history.best_iteration is not None:
            ax2.plot([history.best_iteration], [history.best_rmse], "*", color="black", ms=10, label="kept (best)")
    ax2.set_ylabel("validation RMSE vs ground truth", color="tab:red")
    ax2.set_yscale("log")
    lines = ax1.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax1.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax2.legend(lines, labels, loc="upper right", fontsize=8)
    ax1.set_title(title or f"Bespoke solver training (NFE {history.nfe})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
