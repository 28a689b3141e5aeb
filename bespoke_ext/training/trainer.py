"""``train``: learn a Bespoke solver's parameters theta for a frozen flow model (method.md §5).

One iteration:
    1. table  = the solver's coefficient table (times, stage times, update rows, weights M_i),
                differentiable in theta;
    2. ground truth at table.times for this iteration's batch (online solve or cache), differentiable
                in the times (x_aux or Hermite);
    3. loss   = bound loss (teacher-forced, all n steps in one batch) or end-to-end loss, back-propagated
                chunk by chunk;
    4. gradients summed across ranks (average over the global batch), optionally clipped; Adam step.
Every ``val_every`` iterations the solver is validated against held-out ground truth, sampled exactly as
``bespoke_ext.sample(model, x0, solver=solver)`` samples; the best solver by validation RMSE is kept.
Checkpoints are periodic and atomic; rerunning with the same checkpoint path resumes, and an interrupted
run (Ctrl-C) saves its last complete iteration before it stops.

The model's weights are frozen for the duration (requires_grad False, eval mode; both restored after),
but the model is NOT run under no_grad: the loss differentiates through its inputs x and t.

Conditions: with a pool {name: Tensor [M, ...]} every ground-truth trajectory, training sample and
validation sample draws one row index r, the same for every name, and the model is called as
``model(x, t, name=pool[name][r], ..., **model_extras)`` (one row per sample of x). The rows follow
the samples through groups, chunks and the bound loss's n*B tiling; the cache stores each trajectory's
row; validation draws its own rows.

Before any ground truth, one probe call on a batch of 2 (conditions rows and model_extras included)
checks that the model accepts those names and returns a finite floating tensor of x's shape and dtype
on the training device.

Dtype policy: ground truth and solver states are float32 or float64 (``dtype``); a bfloat16/float16
model is called in its own dtype, x cast to it and the velocity cast back (groundtruth/inputs.py).

Identity: caches and checkpoints are keyed by ``model_tag(model)`` (weights and settings of the module
and its submodules) and ``inputs_tag(model_extras, conditions)``; a plain function, lambda or partial
needs an explicit ``model_tag`` or ``cache_dir`` (then its code, closure values and named globals still
enter the tag: a folder solved for another closure or global model is refused).

Non-finite steps: a loss or gradient that is not finite skips the step (``history.skipped``, one
warning); ``max_nonfinite_steps`` in a row stop training with NonFiniteTrainingError, after saving the
last good state to the checkpoint, if any.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

import torch

from ..integers import as_int
from ..groundtruth import CacheSpec, TrajectoryCache, build_cache, fine_grid, finalize_cache
from ..groundtruth.inputs import as_positional, check_conditions, velocity_of, model_call_dtype, pool_size
from ..sampling.executor import StateDtype
from ..models.identity import inputs_tag, training_tag
from .batches import CachedBatches, OnlineBatches, derive_seed
from .checkpoint import check_fingerprint, check_iterations, load_checkpoint, save_checkpoint
from .distributed import DistContext, distributed_context, note_failure, resolve_device
from .history import TrainHistory
from .least_squares_start import least_squares_start, warped
from .loss import Recomputed, bound_loss, end_to_end_loss, solver_table
from .options import TrainOptions, solver_defaults
from .probe import frozen, model_device_dtype, probe_model
from .validation import ValidationSet

__all__ = ["train", "default_cache_root", "NonFiniteTrainingError"]


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient (TrainOptions.max_nonfinite_steps)."""


def train(model: Callable, solver, *, shape: Sequence[int], iterations: int, batch_size: int, seed: int = 0,
          conditions=None, **options):
    """Train ``solver`` (a BespokeSolver, changed in place and returned) for the velocity field ``model``.

    Args:
        model: ``model(x, t, **extras)`` with x [B, *shape] and t per-sample times [B] (the bound loss) or a
            0-dim time (validation and the end-to-end loss, which sample as ``bespoke_ext.sample`` does);
            differentiable in x and t. Its weights are frozen during training. (An object with a
            ``.velocity`` attribute, such as an embedded model, is accepted too.)
        solver: the solver to train, e.g. ``BespokeSolver(5, order=2)`` (identity-initialised).
        shape: per-sample shape of x, e.g. (2,) or (1, 28, 28).
        iterations: optimizer steps. At 0 a solver with a least-squares start (fit_start) is fitted and
            validated before and after; any other comes back as given, nothing solved, no validation.
        batch_size: noise samples per iteration (global, split across ranks under torchrun).
        seed: seeds every random stream (batches, validation noise, cache noise, condition rows).
        conditions: None, or a pool {name: Tensor [M, ...]} of per-sample model inputs (class labels, text
            embeddings), all with the same leading dimension M. Each ground-truth trajectory, training sample
            and validation sample draws one row r (the same for every name) and the model is called as
            ``model(x, t, name=pool[name][r], ..., **model_extras)``. Constant inputs stay in model_extras.
            The solver then samples with per-sample extras: ``bespoke_ext.sample(model, x0, solver=s, y=...)``.
        **options: see ``TrainOptions`` (lr, L_tau, loss, gt, gt_rtol/gt_atol, cache_*, val_size, val_every,
            device, dtype, model_extras, model_tag, chunk_size, progress, checkpoint, checkpoint_every,
            max_nonfinite_steps, ...).
    Returns the solver, with ``solver.history`` (a ``TrainHistory``) attached; with keep_best (default) its
    parameters are those of the best validation RMSE seen.
    """
    opts = TrainOptions.from_kwargs(**solver_defaults(solver, options))  # the solver's own loss, fit_start, lr
    if opts.fit_start and not getattr(solver, "supports_least_squares_start", False):
        raise ValueError(f"fit_start=True needs a solver that is linear in its coefficients (NonStationarySolver); "
                         f"{type(solver).__name__} is not: leave fit_start unset")
    if opts.loss == "bound" and not getattr(solver, "supports_bound_loss", True):
        raise ValueError(f"loss='bound' needs a scale-time solver's per-step coefficients; {type(solver).__name__} "
                         f"is trained on its final sample: pass loss='log_mse' (its paper's loss) or 'end_to_end'")
    model = velocity_of(model)
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t), got {type(model).__name__}")
    shape = _check_shape(shape)
    for name, value, low in (("iterations", iterations, 0), ("batch_size", batch_size, 1)):
        if as_int(value) is None or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if as_int(seed) is None:
        raise ValueError(f"seed must be an integer, got {seed!r}")
    iterations, batch_size, seed = as_int(iterations), as_int(batch_size), as_int(seed)
    for attr in ("step_coefficients", "program", "times", "lipschitz", "steps", "order", "nfe"):
        if not hasattr(solver, attr):
            raise TypeError(f"solver must be a BespokeSolver (lacks .{attr}), got {type(solver).__name__}")
    device, dtype = model_device_dtype(model, opts.device, opts.dtype, exclude=solver)
    device = resolve_device(device)          # under torchrun, "cuda" means this process's GPU
    pool = check_conditions(conditions, opts.model_extras)
    if pool:
        pool = {name: v.to(device) for name, v in pool.items()}
    tag = training_tag(model, opts.model_tag, opts.cache_dir)
    ctx = distributed_context(device)
    try:
        with frozen(model, keep=solver):
            model = as_positional(model)   # after identity and freezing, which read the model itself
            probe_model(model, shape, device=device, dtype=dtype, extras=opts.model_extras, conditions=pool)
            return _Run(model, solver, shape, iterations, batch_size, seed, opts, device, dtype, ctx, pool, tag).run()
    except BaseException as exc:
        if ctx.enabled:  # the other ranks may wait in a collective this one will never join: skip the exit barrier
            note_failure(type(exc))
        raise


def _check_shape(shape) -> Tuple[int, ...]:
    try:
        dims = tuple(as_int(s) for s in shape)
    except TypeError:   # not a sequence
        dims = None
    if dims is None or None in dims:
        raise ValueError(f"shape must be a sequence of positive integers (per-sample shape), got {shape!r}")
    if not dims or min(dims) < 1:
        raise ValueError(f"shape must be a non-empty sequence of positive integers, got {shape!r}")
    return dims


def default_cache_root() -> Path:
    """$BESPOKE_EXT_CACHE_DIR, else $XDG_CACHE_HOME/bespoke_ext/trajectories (~/.cache by default)."""
    if os.environ.get("BESPOKE_EXT_CACHE_DIR"):
        return Path(os.environ["BESPOKE_EXT_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "bespoke_ext" / "trajectories"


class _Run:
    def __init__(self, model, solver, shape, iterations, batch_size, seed, opts: TrainOptions, device, dtype,
                 ctx: DistContext, pool: Optional[dict], tag: str):
        # Every call the package makes goes through the dtype policy (a bf16/fp16 model in its own dtype).
        self.model = StateDtype(model, model_call_dtype(model))
        self.solver, self.shape = solver, shape
        self.iterations, self.batch_size, self.seed = iterations, batch_size, seed
        self.opts, self.device, self.dtype, self.ctx = opts, device, dtype, ctx
        self.extras = dict(opts.model_extras)
        self.pool = pool
        self.tag = tag
        self.inputs = inputs_tag(self.extras, pool)
        self.show = opts.progress and ctx.is_main

    # -- identity of the run (checkpoints refuse to resume anything else) ------------------------
    def fingerprint(self) -> dict:
        o = self.opts
        return {"model_tag": self.tag, "shape": list(self.shape), "steps": self.solver.steps, "order": self.solver.order,
                "solver_class": type(self.solver).__name__, "iterations": self.iterations,
                "batch_size": self.batch_size, "seed": self.seed, "dtype": str(self.dtype), "lr": o.lr,
                "L_tau": o.L_tau, "loss": o.loss, "schedule": o.schedule, "lr_final_fraction": o.lr_final_fraction,
                "clip": o.clip, "keep_best": o.keep_best, "gt": o.gt, "gt_rtol": o.gt_rtol, "gt_atol": o.gt_atol,
                "gt_group_size": o.gt_group_size, "cache_samples": o.cache_samples, "cache_grid": o.cache_grid,
                "cache_grid_kind": o.cache_grid_kind, "cache_shard_size": o.cache_shard_size, "val_size": o.val_size,
                "val_every": o.val_every, "model_extras": o.to_json()["model_extras"], "inputs_tag": self.inputs,
                "conditions": _pool_json(self.pool), "solver_start": _solver_start(self.solver),
                "gradient_checkpointing": o.gradient_checkpointing, "fit_start": self.fits_start,
                "fit_samples": o.fit_samples, "fit_warps": list(o.fit_warps)}

    @property
    def fits_start(self) -> bool:
        """Whether the run begins with the least-squares start (TrainOptions.fit_start, resolved by
        options.solver_defaults)."""
        return bool(self.opts.fit_start)

    def fit_start(self, batches) -> Tuple[dict, float]:
        """The least-squares start (training/least_squares_start.py) on ``fit_samples`` trajectories; returns
        its report and the seconds of ground-truth work in it."""
        o = self.opts
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "fit"))
        before = batches.gt_seconds
        given = self.solver.times()
        grids = torch.cat([warped(given, p) for p in o.fit_warps])
        x0, target, cond = batches.fit_set(grids, o.fit_samples, generator)
        report = least_squares_start(self.solver, self.model, x0, target, ctx=self.ctx, extras=self.extras,
                                     conditions=cond, chunk_size=o.chunk_size, warps=o.fit_warps)
        return report, batches.gt_seconds - before

    def lr_at(self, it: int) -> float:
        o = self.opts
        if o.schedule == "constant":
            return o.lr
        frac = it / max(1, self.iterations - 1)   # cosine from lr to lr_final_fraction * lr
        return o.lr * (o.lr_final_fraction + (1 - o.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * frac)))

    # -- ground truth ------------------------------------------------------------------------------
    def cache_spec(self) -> CacheSpec:
        o = self.opts
        return CacheSpec(model_tag=self.tag, shape=self.shape, dtype=str(self.dtype).replace("torch.", ""),
                         rtol=o.gt_rtol, atol=o.gt_atol, grid=tuple(fine_grid(o.cache_grid, o.cache_grid_kind).tolist()),
                         num_samples=o.cache_samples, shard_size=o.cache_shard_size, seed=self.seed,
                         inputs_tag=self.inputs, condition_rows=pool_size(self.pool))

    def cache_dir(self, spec: CacheSpec) -> Path:
        if self.opts.cache_dir is not None:
            return Path(self.opts.cache_dir)
        key = hashlib.sha256(json.dumps(spec.to_json(), sort_keys=True).encode()).hexdigest()[:16]
        return default_cache_root() / key

    def batches(self, generator: torch.Generator):
        o = self.opts
        if o.gt == "online":
            return OnlineBatches(self.model, self.shape, batch_size=self.batch_size, generator=generator, ctx=self.ctx,
                                 dtype=self.dtype, device=self.device, rtol=o.gt_rtol, atol=o.gt_atol,
                                 group_size=o.gt_group_size, chunk_size=o.chunk_size, extras=self.extras,
                                 conditions=self.pool)
        spec = self.cache_spec()
        directory = self.cache_dir(spec)
        kw = dict(model_extras=self.extras, device=self.device, group_size=o.gt_group_size, chunk_size=o.chunk_size,
                  progress=self.show, conditions=self.pool)
        if self.ctx.enabled:
            # Ranks build disjoint shards; one finalises the manifest once all are on disk.
            build_cache(self.model, directory, spec, rank=self.ctx.rank, world_size=self.ctx.world_size,
                        finalize=False, **kw)
            self.ctx.barrier()
            if self.ctx.is_main:
                finalize_cache(directory)
            self.ctx.barrier()
        else:
            build_cache(self.model, directory, spec, **kw)
        cache = TrajectoryCache(directory, expect=spec, device=self.device, in_memory=o.cache_in_memory)
        return CachedBatches(cache, batch_size=self.batch_size, generator=generator, ctx=self.ctx, conditions=self.pool)

    # -- the loop ------------------------------------------------------------------------------------
    def run(self):
        o, solver = self.opts, self.solver
        started = time.perf_counter()
        solver.to(self.device)
        optimizer = torch.optim.Adam(solver.parameters(), lr=o.lr)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "batches"))
        history = TrainHistory(nfe=solver.nfe, options=o.to_json())
        start, best_state, elapsed_before = 0, None, 0.0
        fingerprint = self.fingerprint()

        state = load_checkpoint(o.checkpoint) if o.checkpoint else None
        if state is not None:
            # this run's solver given back: as it was interrupted (its last iterate), or as a finished run with
            # keep_best returned it (its best iterate); the run goes on from its last iterate either way
            given = _solver_start(solver)
            if any(given == _solver_start(solver, saved) for saved in (state["solver"], state["best_solver"]) if saved):
                fingerprint["solver_start"] = json.loads(state["fingerprint"]).get("solver_start")
            check_fingerprint(o.checkpoint, state["fingerprint"], fingerprint)
            check_iterations(o.checkpoint, json.loads(state["fingerprint"])["iterations"], int(state["iteration"]),
                             self.iterations, o.schedule)
            solver.load_state_dict(state["solver"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            history = TrainHistory.from_json(state["history"])
            start, elapsed_before = int(state["iteration"]), float(state["elapsed"])
            best_state = {k: v.to(self.device) for k, v in state["best_solver"].items()} if state["best_solver"] else None

        clock = lambda: elapsed_before + time.perf_counter() - started

        def snapshot(iteration):
            # Small (a few hundred numbers): the state an interrupt rolls back to. The history is recorded
            # by its lengths and best-so-far, and cut back to them when saved.
            return {"iteration": iteration, "solver": copy.deepcopy(solver.state_dict()),
                    "optimizer": copy.deepcopy(optimizer.state_dict()), "generator": generator.get_state(),
                    "best_solver": best_state, "best": (history.best_rmse, history.best_iteration),
                    "lengths": (len(history.loss), len(history.val_iteration))}

        def save(snap):
            if not (o.checkpoint and self.ctx.is_main):
                return
            saved = copy.deepcopy(history)
            saved.truncate(*snap["lengths"])
            saved.best_rmse, saved.best_iteration = snap["best"]
            saved.wall_seconds = clock()
            save_checkpoint(o.checkpoint, {
                "iteration": snap["iteration"], "solver": snap["solver"], "optimizer": snap["optimizer"],
                "generator": snap["generator"], "best_solver": snap["best_solver"] or {},
                "history": saved.to_json(), "fingerprint": json.dumps(fingerprint), "elapsed": clock(),
                "validation_x1": val.x1.cpu()})   # the fingerprint pins what it was solved for

        if start < self.iterations or (state is None and self.fits_start):   # iterations=0: the fit alone
            gt_started = time.perf_counter()
            batches = self.batches(generator)
            history.gt_seconds += time.perf_counter() - gt_started
            val = ValidationSet(self.model, self.shape, size=o.val_size, seed=derive_seed(self.seed, "validation"),
                                dtype=self.dtype, device=self.device, rtol=o.gt_rtol, atol=o.gt_atol,
                                group_size=o.gt_group_size, extras=self.extras, ctx=self.ctx, progress=self.show,
                                conditions=self.pool, solved=state.get("validation_x1") if state else None,
                                store=self.cache_dir(self.cache_spec()) if o.gt == "cached" else None)
            history.gt_seconds += val.seconds

            def validate(iteration):
                nonlocal best_state
                with torch.no_grad():
                    # The solver as users sample with it (its program through the executor).
                    rmse, psnr = val.evaluate(self.model, solver, extras=self.extras, chunk_size=o.chunk_size)
                    times = solver.times().cpu().tolist()
                history.val_iteration.append(iteration)
                history.val_rmse.append(rmse)
                history.val_psnr.append(psnr)
                history.val_times.append(times)
                history.val_wall.append(clock())
                if math.isfinite(rmse) and rmse < history.best_rmse:
                    history.best_rmse, history.best_iteration = rmse, iteration
                    best_state = {k: v.detach().clone() for k, v in solver.state_dict().items()}

            if not history.val_iteration:
                validate(0)
                if self.fits_start:
                    fit_started = time.perf_counter()
                    report, fit_gt = self.fit_start(batches)
                    history.gt_seconds += fit_gt
                    history.fit_seconds = time.perf_counter() - fit_started - fit_gt
                    history.fit_warp = report["warp"]
                    if math.isfinite(report["mse"]):
                        validate(0)   # the fitted start: keep_best compares it with the solver as given
            from tqdm.auto import tqdm
            bar = tqdm(total=self.iterations, initial=start, desc=f"training bespoke NFE {solver.nfe}", unit="it",
                       disable=not self.show)
            snap = snapshot(start)
            streak, streak_snap, warned = 0, None, False
            try:
                for it in range(start, self.iterations):
                    snap = snapshot(it)   # small (a few hundred numbers): the state an interrupt rolls back to
                    gt_before = batches.gt_seconds
                    loss, applied = self.step(optimizer, batches, self.lr_at(it))
                    history.gt_seconds += batches.gt_seconds - gt_before
                    history.loss.append(loss)
                    history.lr.append(self.lr_at(it))
                    done = it + 1
                    if applied:
                        streak = 0
                    else:
                        history.skipped_iterations.append(done)
                        streak += 1
                        streak_snap = snap if streak == 1 else streak_snap   # the last good state
                        if not warned and self.ctx.is_main:
                            warnings.warn(f"bespoke_ext.train: iteration {done}: the loss ({loss:.4g}) or a gradient "
                                          f"is not finite; the step was skipped (counted in history.skipped; "
                                          f"{o.max_nonfinite_steps} in a row stop training)", RuntimeWarning,
                                          stacklevel=2)
                            warned = True
                        if streak >= o.max_nonfinite_steps:
                            save(streak_snap)
                            kept = (f"; checkpoint {o.checkpoint} holds the last good state (iteration "
                                    f"{streak_snap['iteration']})" if o.checkpoint else "")
                            raise NonFiniteTrainingError(
                                f"training stopped at iteration {done}: {streak} steps in a row (iterations "
                                f"{done - streak + 1}..{done}) had a non-finite loss or gradient, "
                                f"{history.skipped} skipped in all. The model returns NaN or inf on some "
                                f"training inputs, or the solver diverged (lower lr, set grad_clip){kept}; "
                                f"max_nonfinite_steps={o.max_nonfinite_steps} sets the limit")
                    if done % o.val_every == 0 or done == self.iterations:
                        validate(done)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3g}", val=f"{history.val_rmse[-1]:.3g}", best=f"{history.best_rmse:.3g}")
                    if o.checkpoint and (done % o.checkpoint_every == 0 or done == self.iterations):
                        save(snapshot(done))
            except KeyboardInterrupt:
                save(snap)  # the last complete iteration: rerunning resumes exactly there, with this object too
                solver.load_state_dict(snap["solver"])
                raise
            finally:
                bar.close()
        if o.keep_best and best_state is not None:
            solver.load_state_dict(best_state)
            if start < self.iterations and self.ctx.is_main:
                history.warn_if_start_kept(o.lr)
        history.wall_seconds = clock()
        solver.history = history
        if isinstance(getattr(solver, "metadata", None), dict):
            # Goes into the solver file on save(): how it was trained and for which model.
            solver.metadata["training"] = {**history.summary(), "model_tag": self.tag, "inputs_tag": self.inputs,
                                           "conditions": _pool_json(self.pool), "shape": list(self.shape),
                                           "batch_size": self.batch_size, "seed": self.seed, "options": o.to_json()}
        return solver

    def step(self, optimizer, batches, lr: float) -> Tuple[float, bool]:
        """One optimizer step; returns the global batch's loss and whether the step was applied (finite)."""
        o, solver = self.opts, self.solver
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        kw = dict(normalizer=self.batch_size, chunk_size=o.chunk_size, extras=self.extras, backward=True)
        if o.loss == "bound":
            table = solver_table(solver, L_tau=o.L_tau)
            states, cond = batches.batch(table.times)
            local = bound_loss(self.model, table, states, conditions=cond, **kw)
        else:
            x0, x1, cond = batches.endpoint_batch()
            objective = "log_mse" if o.loss == "log_mse" else "rms"
            model = Recomputed(self.model) if o.gradient_checkpointing else self.model
            local = end_to_end_loss(model, solver, x0, x1, conditions=cond, objective=objective, **kw)
        loss = float(self.ctx.all_reduce_sum_(local.to(self.device)))
        params = [p for p in solver.parameters() if p.requires_grad]
        self.ctx.sum_gradients_(params)
        grads_finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
        if not (math.isfinite(loss) and grads_finite):
            # A diverging step (a collapsed time step, an overflow) is skipped, not applied; every rank
            # sees the same summed gradients and so skips alike.
            optimizer.zero_grad(set_to_none=True)
            return loss, False
        if o.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, o.clip)
        optimizer.step()
        return loss, True


def _solver_start(solver, state: Optional[dict] = None) -> str:
    """Digest of the solver training starts from: every parameter and buffer (a non-stationary solver's base
    tables, a converted or pre-trained start; ``state`` instead of its own) and its settings (refs, base,
    scales), so that a checkpoint never resumes into a solver it was not trained from."""
    h = hashlib.sha256(repr({k: getattr(solver, k, None) for k in ("refs", "base", "time_scale", "coeff_scale")})
                       .encode())
    for name, t in sorted((state if state is not None else solver.state_dict()).items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _pool_json(pool: Optional[dict]) -> dict:
    """The conditions pool described (names, shapes, dtypes): its values are in inputs_tag."""
    return {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in (pool or {}).items()}
