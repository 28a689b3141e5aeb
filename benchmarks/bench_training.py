"""Training benchmark: what a trained Bespoke solver buys, what the cache saves, how long training takes.

    python benchmarks/bench_training.py                 # full report (about 15-25 min on 2 busy CPU cores)
    python benchmarks/bench_training.py --quick         # a smoke run of every case (a few minutes)
    python benchmarks/bench_training.py --rematch       # recompute "base NFE to match" from the stored curves
    pytest benchmarks/bench_training.py --benchmark-only   # per-iteration timings (pytest-benchmark)

Cases, each on a 64-D sharp Gaussian-mixture oracle (exact velocity, 16 components, std 0.05) and on
the embedded 2-D model "moons2d":
  - order 2, 5 steps (NFE 10) vs midpoint at NFE 10; order 1, 10 steps (NFE 10) vs Euler at NFE 10,
    with the bound loss (the default) and with the end-to-end loss; and the NFE midpoint / Euler need
    to reach the trained solver's validation RMSE (from their RMSE-vs-NFE curves on the same samples,
    interpolated in log-log by bespoke_ext.compare.nfe_to_match, as the demo does);
  - cached vs online ground truth, same hyperparameters: best validation RMSE and wall-clock (the cached
    figure includes building the cache from scratch);
  - a default training run for NFE 10 on the 2-D model, from an empty cache: wall-clock.
Every RMSE is against dopri5 ground truth (rtol = atol = 1e-5) on the trainer's own validation set
(512 held-out noise samples). Timings are wall-clock of one run each on a shared machine: compare
them within one report only. Writes benchmarks/results/training.json and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bespoke_ext.compare import nfe_to_match
from bespoke_ext.solvers import BespokeSolver
from bespoke_ext.training import TrainOptions, solver_table, train
from bespoke_ext.training.batches import derive_seed
from bespoke_ext.training.distributed import DistContext
from bespoke_ext.training.validation import ValidationSet

RESULTS = Path(__file__).parent / "results" / "training.json"
SEED = 0
BATCH = 256


def load_model(name: str):
    if name == "gmm64":
        from bespoke_ext.models.oracle import GaussianMixtureFlow

        return GaussianMixtureFlow.random(dim=64, components=16, std=0.05, seed=0), (64,)
    from bespoke_ext.models.embedded import load_embedded

    m = load_embedded("moons2d")
    return m.velocity, tuple(m.shape)


def validation_set(model, shape, opts: TrainOptions) -> ValidationSet:
    """The very samples train() validates on (same stream, size, tolerance)."""
    return ValidationSet(model, shape, size=opts.val_size, seed=derive_seed(SEED, "validation"), dtype=torch.float32,
                         device=torch.device("cpu"), rtol=opts.gt_rtol, atol=opts.gt_atol,
                         group_size=opts.gt_group_size, extras={}, ctx=DistContext())


def base_curve(model, val: ValidationSet, order: int, nfes) -> dict:
    """Validation RMSE of plain Euler (order 1) / midpoint (order 2) at each NFE (identity solvers)."""
    out = {}
    for nfe in nfes:
        base = BespokeSolver(nfe // order, order)  # the identity: exactly the base method, as users sample it
        out[nfe] = float(val.per_sample_errors(model, base, extras={}, chunk_size=8192).double().mean())
    return out


def base_nfe_to_match(curve: dict, rmse: float):
    """(NFE at which the base method's RMSE curve reaches ``rmse``, how it was found), by
    bespoke_ext.compare.nfe_to_match: log RMSE linear in log NFE between the bracketing points. The NFE
    is rounded to 0.1; None where the curve never reaches ``rmse``."""
    nfe, how = nfe_to_match(curve.items(), rmse)
    return (None if nfe is None else round(nfe, 1)), how


def rematch(report: dict) -> dict:
    """Recompute every run's base NFE to match from the curves stored in ``report`` (no training)."""
    for entry in report["models"].values():
        for r in entry["runs"].values():
            r["base_nfe_to_match"], r["base_nfe_to_match_how"] = base_nfe_to_match(entry["curves"][r["base_method"]],
                                                                                   r["best_rmse"])
    return report


def run(model, shape, order, steps, iterations, cache_root, **kw) -> dict:
    solver = BespokeSolver(steps, order)
    start = time.perf_counter()
    train(model, solver, shape=shape, iterations=iterations, batch_size=BATCH, seed=SEED, progress=False,
          cache_dir=str(cache_root), **kw)
    wall = time.perf_counter() - start
    h = solver.history
    return {"order": order, "steps": steps, "nfe": solver.nfe, "iterations": iterations, "options": kw,
            "base_rmse": h.base_rmse, "best_rmse": h.best_rmse, "ratio": h.best_rmse / h.base_rmse,
            "best_iteration": h.best_iteration, "val_iteration": h.val_iteration, "val_rmse": h.val_rmse,
            "times": solver.grid().t.tolist(), "wall_s": wall, "gt_s": h.gt_seconds}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few iterations: checks that every case runs")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: tiny tensors, shared cores)")
    p.add_argument("--models", default="gmm64,moons2d")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--rematch", action="store_true",
                   help="only recompute the base NFE to match from the curves already in --out (no training)")
    args = p.parse_args(argv)
    if args.rematch:
        out = Path(args.out)
        out.write_text(json.dumps(rematch(json.loads(out.read_text())), indent=1))
        print(f"recomputed the base NFE to match in {out}")
        return 0
    torch.set_num_threads(args.threads)
    iters = 40 if args.quick else 300
    cmp_iters = 20 if args.quick else 150
    opts = TrainOptions()
    report = {"machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor(),
                          "cores": os.cpu_count(), "threads": args.threads, "load": os.getloadavg()},
              "defaults": {"lr": opts.lr, "L_tau": opts.L_tau, "batch_size": BATCH, "iterations": iters,
                           "gt": opts.gt, "cache_samples": opts.cache_samples, "cache_grid": opts.cache_grid},
              "models": {}}
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="bench_training_"))
    try:
        for name in args.models.split(","):
            model, shape = load_model(name)
            cache = scratch / f"{name}-cache"
            val = validation_set(model, shape, opts)
            curves = {"midpoint": base_curve(model, val, 2, [10, 12, 14, 16, 20, 24, 30, 40, 60, 80, 120, 160]),
                      "euler": base_curve(model, val, 1, [10, 12, 14, 16, 20, 24, 30, 40, 60, 80, 120, 160, 240, 320])}
            entry = {"curves": curves, "runs": {}}
            for order, steps, base in ((2, 5, "midpoint"), (1, 10, "euler")):
                for loss in ("bound", "end_to_end"):
                    r = run(model, shape, order, steps, iters, cache, loss=loss)
                    r["base_method"] = base
                    r["base_nfe_to_match"], r["base_nfe_to_match_how"] = base_nfe_to_match(curves[base], r["best_rmse"])
                    entry["runs"][f"rk{order}-{steps}-{loss}"] = r
                    rows.append((name, f"order {order}, {steps} steps, {loss}", f"{base} NFE 10 {r['base_rmse']:.4g}",
                                 f"{r['best_rmse']:.4g}", f"{r['ratio']:.3f}x", f"{r['base_nfe_to_match']}", f"{r['wall_s']:.0f}s"))
            if name == "moons2d":
                # Cached vs online: same hyperparameters; the cached run starts from an empty cache.
                shutil.rmtree(scratch / "cmp-cache", ignore_errors=True)
                cached = run(model, shape, 2, 5, cmp_iters, scratch / "cmp-cache", gt="cached")
                online = run(model, shape, 2, 5, cmp_iters, scratch / "unused", gt="online")
                entry["cached_vs_online"] = {"cached": cached, "online": online,
                                             "rmse_ratio": cached["best_rmse"] / online["best_rmse"],
                                             "speedup": online["wall_s"] / cached["wall_s"]}
                # A default run (what `bespoke-ext train moons2d` does) from an empty cache.
                shutil.rmtree(scratch / "default-cache", ignore_errors=True)
                d = run(model, shape, 2, 5, 300, scratch / "default-cache")
                entry["default_run"] = d
            report["models"][name] = entry
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out}  (threads {args.threads}, load {report['machine']['load'][0]:.1f})\n")
    header = ("model", "solver (NFE 10)", "base method", "trained RMSE", "ratio", "base NFE to match", "wall")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    if "moons2d" in report["models"]:
        m = report["models"]["moons2d"]
        c = m["cached_vs_online"]
        print(f"\nmoons2d, order 2, 5 steps, {cmp_iters} iterations: cached RMSE {c['cached']['best_rmse']:.4g} in "
              f"{c['cached']['wall_s']:.0f}s (cache build included), online RMSE {c['online']['best_rmse']:.4g} in "
              f"{c['online']['wall_s']:.0f}s: RMSE ratio {c['rmse_ratio']:.3f}, {c['speedup']:.1f}x less wall-clock")
        d = m["default_run"]
        print(f"default run (moons2d, NFE 10, 300 iterations, empty cache): {d['wall_s']:.0f}s, "
              f"RMSE {d['best_rmse']:.4g} ({d['ratio']:.3f}x midpoint)")
    return 0


# ---------------------------------------------------------------------------------------------
# pytest-benchmark: one training iteration (bound loss, order 2, 5 steps, batch 256) on moons2d.

def _iteration_setup(gt):
    from bespoke_ext.training.batches import CachedBatches, OnlineBatches
    from bespoke_ext.training.loss import bound_loss

    model, shape = load_model("moons2d")
    solver = BespokeSolver(5, 2)
    gen = torch.Generator().manual_seed(0)
    if gt == "online":
        batches = OnlineBatches(model, shape, batch_size=BATCH, generator=gen, ctx=DistContext(), dtype=torch.float32,
                                device=torch.device("cpu"), rtol=1e-5, atol=1e-5, group_size=256, chunk_size=16384,
                                extras={})
    else:
        from bespoke_ext.groundtruth import CacheSpec, TrajectoryCache, build_cache, fine_grid
        from bespoke_ext.models.identity import model_tag

        spec = CacheSpec(model_tag=model_tag(model), shape=shape, dtype="float32", rtol=1e-5, atol=1e-5,
                         grid=tuple(fine_grid(64).tolist()), num_samples=512, shard_size=512, seed=0)
        d = tempfile.mkdtemp(prefix="bench_cache_")
        build_cache(model, d, spec, progress=False)
        batches = CachedBatches(TrajectoryCache(d, expect=spec), batch_size=BATCH, generator=gen, ctx=DistContext())

    def step():
        solver.zero_grad()
        table = solver_table(solver, L_tau=1.0)
        bound_loss(model, table, batches.states(table.times), backward=True)

    return step


def test_iteration_cached(benchmark):
    benchmark(_iteration_setup("cached"))


def test_iteration_online(benchmark):
    benchmark.pedantic(_iteration_setup("online"), rounds=3, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
