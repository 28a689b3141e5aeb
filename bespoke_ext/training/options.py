"""Training options: every knob of ``train`` with its default and the reason for it.

Defaults were chosen from runs of 300 iterations, batch 256, order 2 with 5 steps (NFE 10) on a sharp
64-D Gaussian-mixture oracle and on the embedded 2-D model (benchmarks/bench_training.py):
  - lr 5e-3: best validation RMSE / midpoint's, bound loss: lr 1e-3 -> 0.17x mixture, 0.51x 2-D;
    3e-3 -> 0.30x, 0.47x; 5e-3 -> 0.26x, 0.46x; 1e-2 -> 0.42x, 0.45x. End-to-end loss at 5e-3:
    0.20x, 0.39x.
  - L_tau 1 (the paper's): 0, 0.3, 1 and 3 gave 0.24x, 0.23x, 0.30x, 0.31x on the mixture at lr 3e-3,
    within the run-to-run spread of that sharp case.
  - cached ground truth of 2048 trajectories on a 64-interval grid: same validation RMSE as online
    ground truth (ratio 0.996) at 9.9x less wall-clock, cache build included.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional

import torch

from ..groundtruth.grid import DEFAULT_GRID_INTERVALS, DEFAULT_GRID_KIND, GRID_KINDS

__all__ = ["TrainOptions", "LOSSES", "GT_MODES", "LR_SCHEDULES", "solver_defaults"]

LOSSES = ("bound", "end_to_end", "log_mse")
GT_MODES = ("cached", "online")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainOptions:
    """Options of ``bespoke_ext.train`` (pass them as keyword arguments).

    Optimisation
        lr: Adam learning rate on the solver's raw parameters (5e-3; without an lr, ``bx.train`` uses the
            solver's own where it has one: a NonStationarySolver after the least-squares start takes
            1e-2 / nfe, ``NonStationarySolver.default_lr``).
        L_tau: Lipschitz stand-in of the model in the bound loss's weights M_i (method.md §5).
        loss: "bound" (the paper's: sum_i M_i d_i over teacher-forced local errors) or "end_to_end"
            (|| x_n(theta) - x(1) || through the whole solver: a fine-tuning stage; start it from a
            bound-trained solver, with a small lr, cosine decay and clipping) or "log_mse" (the
            non-stationary paper's: mean over samples of log || x_n(theta) - x(1) ||^2, PSNR's own
            objective, through the same end-to-end path; the loss for NonStationarySolver).
            ``bx.train`` without a loss uses the solver's own: "bound" for BespokeSolver, "log_mse" for
            NonStationarySolver (whose final-sample training has no per-step bound).
        lr_schedule: "constant" or "cosine" (decay to lr_final_fraction * lr at the last iteration);
            None picks constant for "bound" and cosine for the end-to-end losses.
        lr_final_fraction: where the cosine schedule ends.
        grad_clip: clip the solver's gradient to this 2-norm (None: no clipping); None by default for
            "bound", 1.0 for the end-to-end losses (they can spike when a time step collapses).
        keep_best: return the solver of the best validation RMSE seen, not the last one.
        fit_start: fit the solver's coefficients to ground truth by least squares before the first step
            (training/least_squares_start.py), its times kept; None (default): for solvers linear in their
            coefficients (NonStationarySolver), not for BespokeSolver (True there is an error). Validation
            runs before and after it (two entries at iteration 0), so keep_best never returns worse than
            the solver as given. Skipped on resume (the checkpoint holds the fitted solver).
        fit_warps: time grids the fit tries, as powers p of the solver's own times (t -> t^p); the grid of the
            lowest final error on the fit's samples is kept (least_squares_start.py). Default (1.0,): the
            grid as given. The search measured mixed: on mnist_cond (g = 2, NFE 10) it chose p = 1.19, RMSE
            0.0298 against 0.0363 at p = 1; on MNIST it chose 1.41, 0.0204 after training against 0.0173.
        fit_samples: trajectories of the fit: the cache's first fit_samples (all, if it holds fewer), or as
            many fresh ones solved at the solver's times with gt="online".
        max_nonfinite_steps: a step whose loss or gradient is not finite (NaN/inf) is skipped, counted in
            ``history.skipped`` and warned about (once); this many skipped steps in a row stop training with
            an error (the checkpoint, if any, keeps the last good state).
    Ground truth
        gt: "cached" (solve a fixed set of trajectories once on a fine grid, read back by Hermite
            interpolation) or "online" (the paper's: fresh noise and an adaptive solve every iteration).
        gt_rtol, gt_atol: dopri5 tolerances of every ground-truth solve (<= 1e-5).
        gt_group_size: samples per adaptive solve (a group shares one step sequence, so a sample's ground
            truth depends on its group at the tolerance level; under torchrun each rank solves its slice of
            the batch in groups, which matches one process exactly when the per-rank batch is a multiple of
            gt_group_size, and to the tolerance otherwise). Smaller groups take fewer evaluations (each steps
            for its own hardest sample: mnist_cond at g = 4, 332 a trajectory in one group of 64, 320 in groups
            of 32, 303 in groups of 8) and, on a CPU, can run faster per sample: the embedded U-Nets cost the
            same per sample up to a network batch of 64 and 1.4-1.7x that at 128 (1 thread; a guided model's
            network batch is twice the group). Other groups are other trajectories: the demo keeps one group
            per cache, the pairs its presets were chosen on (mnist_cond in groups of 32 solved its ground truth
            in 27 s instead of about 60, but its g = 2, NFE 10 order-2 solver gained +2.15 dB over midpoint
            instead of +3.47).
        cache_dir: folder of the trajectory cache; None: a folder named by the cache's contents (model tag,
            inputs tag, tolerances, grid, samples, seed) under $BESPOKE_EXT_CACHE_DIR (default
            ~/.cache/bespoke_ext/trajectories), reused across runs of the same model and inputs only.
        cache_samples: trajectories in the cache (the training set of "cached" mode).
        cache_grid: intervals of the fine grid; cache_grid_kind: "mixed", "cosine" or "uniform".
        cache_shard_size: trajectories per shard file (unit of resumption and of parallel building). Each
            shard draws its noise from (seed, shard index), so that ranks build shards independently: another
            shard size is another set of trajectories (and another cache), not a storage detail.
        cache_in_memory: bytes up to which the cache is read into memory instead of memory-mapped.
    Validation
        val_size: held-out noise samples whose ground truth x(1) is solved once (with gt="cached", kept in
            the cache's folder: the next run on that cache with the same val_size, seed and gt_group_size
            reads it instead of solving it again).
        val_every: iterations between validations (also the first and last iteration).
    Execution
        device: where the model runs (default: the device of the model's weights, for a plain function those
            of the network it calls (models.identity.reachable_state); the CPU for a callable that reaches none: pass
            device= for one that computes elsewhere, the model probe says so).
        dtype: the precision of ground truth and solver states, torch.float32 or torch.float64 (default: the
            model's own when it is one of those, else float32). A bfloat16 / float16 model is called in its
            own dtype (x cast to it for the call, the velocity cast back to the state's dtype), so ground
            truth is still solved and stored in float32/float64 at gt_rtol/gt_atol; times are passed in
            the state's dtype.
        model_extras: constant keyword arguments passed to every model call (a guidance flag, a fixed label);
            per-sample inputs (class labels, text embeddings) go in train()'s ``conditions`` instead.
        model_tag: the model's identity in caches and checkpoints (default: models.identity.model_tag: class,
            weights and every submodule's settings). Needed for a plain function, lambda or partial, whose
            state the package cannot see, unless an explicit cache_dir is given. Cache keys and checkpoint
            fingerprints also cover inputs_tag(model_extras, conditions).
        chunk_size: most samples per model call in the loss (bounds memory: the n*B teacher-forced
            evaluations are split into chunks whose graphs are freed one by one).
        gradient_checkpointing: end-to-end losses only: keep no model activations through the rollout and
            recompute each evaluation's in the backward pass (torch.utils.checkpoint). The graph then holds
            the n states and velocities instead of n evaluations' activations (measured in the README,
            Memory), for about one more forward pass per evaluation. For large models (transformers).
        progress: tqdm progress bars (rank 0 only).
        checkpoint: file for periodic, atomic training checkpoints; rerunning with the same path resumes.
            A finished run may be extended with more iterations; fewer than it trained, or another total
            for an unfinished cosine-schedule run, are refused (checkpoint.check_iterations).
        checkpoint_every: iterations between checkpoints (and at the end, and on KeyboardInterrupt).
    """

    lr: float = 5e-3
    L_tau: float = 1.0
    loss: str = "bound"
    lr_schedule: Optional[str] = None
    lr_final_fraction: float = 0.05
    grad_clip: Optional[float] = None
    keep_best: bool = True
    fit_start: Optional[bool] = None
    fit_samples: int = 256
    fit_warps: tuple = (1.0,)
    max_nonfinite_steps: int = 10
    gt: str = "cached"
    gt_rtol: float = 1e-5
    gt_atol: float = 1e-5
    gt_group_size: int = 256
    cache_dir: Optional[str] = None
    cache_samples: int = 2048
    cache_grid: int = DEFAULT_GRID_INTERVALS
    cache_grid_kind: str = DEFAULT_GRID_KIND
    cache_shard_size: int = 512
    cache_in_memory: int = 1 << 30
    val_size: int = 512
    val_every: int = 25
    device: Optional[Any] = None
    dtype: Optional[torch.dtype] = None
    model_extras: Dict[str, Any] = field(default_factory=dict)
    model_tag: Optional[str] = None
    chunk_size: int = 16384
    gradient_checkpointing: bool = False
    progress: bool = True
    checkpoint: Optional[str] = None
    checkpoint_every: int = 50

    @classmethod
    def from_kwargs(cls, **kwargs) -> "TrainOptions":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"train() got unknown option(s) {unknown}; known options: {sorted(names)}")
        opts = cls(**kwargs)
        opts.validate()
        return opts

    def validate(self) -> None:
        def positive(name, integer=False, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if not ok or isinstance(v, bool) or (v < 0 if allow_zero else v <= 0):
                kind = "an integer" if integer else "a number"
                raise ValueError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {v!r}")

        positive("lr")
        positive("L_tau", allow_zero=True)
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.lr_schedule is not None and self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES} or None, got {self.lr_schedule!r}")
        if not 0 < self.lr_final_fraction <= 1:
            raise ValueError(f"lr_final_fraction must be in (0, 1], got {self.lr_final_fraction!r}")
        if self.grad_clip is not None:
            positive("grad_clip")
        if self.gt not in GT_MODES:
            raise ValueError(f"gt must be one of {GT_MODES}, got {self.gt!r}")
        for name in ("gt_rtol", "gt_atol"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0 < v <= 1e-5:
                raise ValueError(f"{name} must be in (0, 1e-5] (ground truth is solved at 1e-5 or tighter), got {v!r}")
        for name in ("gt_group_size", "cache_samples", "cache_grid", "cache_shard_size", "val_size", "val_every",
                     "chunk_size", "checkpoint_every", "max_nonfinite_steps", "fit_samples"):
            positive(name, integer=True)
        if self.cache_grid < 2:
            raise ValueError(f"cache_grid must be >= 2 intervals, got {self.cache_grid}")
        if self.cache_grid_kind not in GRID_KINDS:
            raise ValueError(f"cache_grid_kind must be one of {GRID_KINDS}, got {self.cache_grid_kind!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"device must be a torch device or its name ('cpu', 'cuda', 'cuda:1'), "
                                 f"got {self.device!r}") from exc
        if self.dtype is not None and self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64 (or None: the model's), got {self.dtype!r}")
        if self.fit_start is not None and not isinstance(self.fit_start, bool):
            raise ValueError(f"fit_start must be True, False or None (the solver's default), got {self.fit_start!r}")
        warps = self.fit_warps
        if (not isinstance(warps, (tuple, list)) or not warps or warps[0] != 1.0 or any(
                isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p < math.inf for p in warps)):
            raise ValueError(f"fit_warps must be a sequence of positive powers starting with 1.0 (the grid as "
                             f"given), got {warps!r}")
        self.fit_warps = tuple(float(p) for p in warps)
        for name in ("gradient_checkpointing", "keep_best", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.gradient_checkpointing and self.loss == "bound":
            raise ValueError("gradient_checkpointing applies to the end-to-end losses (a rollout through the solver); "
                             "the bound loss makes independent evaluations, which chunk_size bounds")
        if not isinstance(self.model_extras, dict):
            raise ValueError(f"model_extras must be a dict of keyword arguments, got {type(self.model_extras).__name__}")
        # constant inputs, not parameters: a tensor still attached to the graph that made it (an encoder's
        # output) would collect the losses' gradients into that encoder, and fail at the second backward
        self.model_extras = {k: v.detach() if torch.is_tensor(v) else v for k, v in self.model_extras.items()}
        for name in ("cache_dir", "checkpoint"):  # a str or a pathlib.Path; kept as str (it goes into JSON metadata)
            v = getattr(self, name)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise ValueError(f"{name} must be a path (str or os.PathLike) or None, got {type(v).__name__}")
            setattr(self, name, None if v is None else os.fspath(v))

    @property
    def schedule(self) -> str:
        return self.lr_schedule or ("constant" if self.loss == "bound" else "cosine")

    @property
    def clip(self) -> Optional[float]:
        if self.grad_clip is not None:
            return self.grad_clip
        return None if self.loss == "bound" else 1.0

    def to_json(self) -> Dict[str, Any]:
        """JSON-safe summary (for checkpoints and solver metadata); tensors in extras are described, not stored."""
        d = asdict(self)
        d["dtype"] = None if self.dtype is None else str(self.dtype).replace("torch.", "")
        d["device"] = None if self.device is None else str(self.device)
        d["model_extras"] = {k: (f"<tensor {tuple(v.shape)}>" if torch.is_tensor(v) else repr(v))
                             for k, v in self.model_extras.items()}
        return d


def solver_defaults(solver, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` with the defaults that depend on the solver filled in where they are not given: the
    loss (``solver.default_loss``: "bound" for BespokeSolver, "log_mse" for NonStationarySolver),
    fit_start (True for solvers linear in their coefficients, ``supports_least_squares_start``) and the
    lr (``solver.default_lr(fitted)``, where the solver has one; lr=None counts as not given)."""
    out = {"loss": getattr(solver, "default_loss", "bound"), **options}
    if out.get("fit_start") is None:
        out["fit_start"] = bool(getattr(solver, "supports_least_squares_start", False))
    if out.get("lr") is None:   # not given, or None (the command line's "not given")
        out.pop("lr", None)
        lr = solver.default_lr(out["fit_start"] is True) if hasattr(solver, "default_lr") else None
        if lr is not None:
            out["lr"] = lr
    return out
