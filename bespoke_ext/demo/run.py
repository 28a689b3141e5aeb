"""``bespoke-ext demo``: the whole method on an embedded model, against the solvers a user would pick.

Stages (each timed; tqdm bars on the slow ones):
    1. load       the embedded model, its digit classifier (image models) and held-out real data
    2. truth      ground truth x(1) for a fixed evaluation batch: dopri5 at rtol = atol = 1e-5
    3. train      for each requested NFE: Bespoke solvers of order 2 (midpoint base) and order 1 (Euler
                  base), and a non-stationary solver (method.md §9, Euler base, log-MSE loss), on cached
                  ground truth of separate noise (built once, shared by all of them)
    4. evaluate   every solver on the evaluation batch: Euler, midpoint, Heun, RK4, DPM-Solver++(2M)
                  over a sweep of NFEs, dopri5 at a loose tolerance, the Bespoke solvers; RMSE and
                  PSNR against ground truth, FCD (image models) or sliced Wasserstein (2-D) against
                  real data, wall-clock per batch
    5. report     results.md / results.json, the trained solver files, the evaluation batch (x0 and
                  its ground truth, evaluation_batch.safetensors), figures (samples.png,
                  rmse_vs_nfe.png, bespoke_schedules.png, nonstationary_schedules.png), and a summary
                  that says what the numbers mean: the gain over the usual solvers at equal NFE, the NFE
                  midpoint needs to match each order-2 and non-stationary solver, and training cost
                  (ground truth included) as a fraction of the model's pretraining wall-clock (its
                  pretraining loop replayed for a few seconds, so that both are timed at the same machine
                  speed; a quick run reads the card's figure instead).
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from .. import metrics
from ..compare import (BASELINES, Reference, Row, baseline_labels, baseline_run, compare, dopri5_run,
                       ground_truth, markdown_table, nfe_to_match, solver_label, solver_run, stream_seed, torch_threads,
                       write_results)
from ..figures import save_error_curves, save_nonstationary, save_sample_grid, save_schedules
from ..groundtruth.atomic import atomic_save_tensors
from ..models.embedded import DEFAULT_MODEL, list_embedded, load_embedded
from ..solvers import BespokeSolver, NonStationarySolver
from ..training import train
from .conditional import DemoModel, demo_model
from .presets import Preset, check_nfes, settings

__all__ = ["run", "train_solvers", "baseline_runs", "solver_file_name", "row_order", "LOOSE_TOL", "FAMILIES",
           "closing_lines", "publish"]

LOOSE_TOL = 1e-3  # the dopri5 row: what an adaptive solver costs at an error comparable to the others

# -- the run -----------------------------------------------------------------------------------------

@dataclass
class _Clock:
    """Wall-clock per stage, in the order the stages ran."""

    stages: Dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - start


def run(model: Optional[str] = None, nfe: Sequence[int] = (8, 10), out="bespoke-demo", *, batch: Optional[int] = None,
        iterations: Optional[int] = None, loss: Optional[str] = None, seed: int = 0, quick: bool = False, progress: bool = True,
        threads: Optional[int] = None, guidance: Optional[float] = None, stream=None) -> dict:
    """The demo as a function: returns the summary dict (also in ``<out>/results.json``).

    ``threads``: torch CPU threads for the run (restored after; default half the cores, see
    ``compare.torch_threads``).
    ``guidance``: for a class-conditional model, the classifier-free guidance scale g (default 2;
    demo/conditional.py); the solvers are trained for its whole label pool.
    ``stream`` receives the printed report (default sys.stdout); progress bars go to stderr.
    """
    with torch_threads(threads):
        return _run(model, nfe, out, batch, iterations, loss, seed, quick, progress, guidance, stream)


def _run(model, nfe, out, batch, iterations, loss, seed, quick, progress, guidance, stream) -> dict:
    stream = stream or sys.stdout
    say = lambda text="": print(text, file=stream, flush=True)
    name = model or DEFAULT_MODEL
    if name not in list_embedded():
        raise ValueError(f"--model must be one of the embedded models {list_embedded()}, got {name!r}")
    nfes = check_nfes(nfe)
    cfg = settings(name, batch, iterations, loss, quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    started = time.perf_counter()

    with clock.stage("load"), _steps(2, "loading the model and real data", progress) as bar:
        em = demo_model(load_embedded(name), guidance)
        bar.update(1)
        reference = Reference.for_model(em, cfg.batch, seed)
        bar.update(1)
    say(f"model {em.name}: {em.card.get('description', '')}")
    if em.conditional:
        say(f"classifier-free guidance g = {em.guidance:g}; the evaluation batch cycles through the labels "
            f"0-{em.num_classes - 1}, and the solvers are trained for the whole label pool")
    say(f"evaluation batch {cfg.batch}, Bespoke NFEs {nfes}, {cfg.iterations} training iterations per scale-time "
        f"solver ({cfg.loss.replace('_', '-')} loss), {cfg.ns_iterations} per non-stationary one"
        f"{' (quick run: numbers not meaningful)' if quick else ''}")

    g = torch.Generator().manual_seed(stream_seed(seed, "demo-evaluation"))
    x0 = torch.randn(cfg.batch, *em.shape, generator=g, dtype=em.dtype)
    extras = em.extras(cfg.batch)
    with clock.stage("ground truth"):
        truth = ground_truth(em.velocity, x0, progress=progress, extras=extras)
    # kept, so that any row of the table can be recomputed from the saved solvers
    atomic_save_tensors(out / "evaluation_batch.safetensors", {"x0": x0.contiguous(), "ground_truth": truth.x.contiguous(),
                                                             **{k: v.contiguous() for k, v in extras.items()}})

    with clock.stage("train"), tempfile.TemporaryDirectory(prefix="bespoke-demo-gt-") as cache_dir:
        solvers, train_seconds, gt_seconds = train_solvers(em, nfes, cfg, seed, cache_dir, out, progress)
    pretraining = pretraining_reference(em, quick, clock, say)

    labels = baseline_labels(em.card)
    with clock.stage("evaluate"):
        runs = [solver_run(s) for s in solvers] + [dopri5_run(LOOSE_TOL)] + list(baseline_runs(nfes, cfg, labels))
        rows, samples = compare(em.velocity, x0, truth, runs, reference=reference, progress=progress, extras=extras)
        rows = rows[:1] + sorted(rows[1:], key=row_order)

    with clock.stage("report"):
        summary = _summarise(em, rows, samples, truth.x, nfes, solvers, train_seconds, gt_seconds, pretraining,
                             reference, labels, quick)
        figures = _figures(out, em, x0, samples, rows, solvers, nfes, summary, labels, progress)
        if em.conditional:
            figures.append(_label_grid(out, em, samples, extras[em.cond_key], max(nfes)))
        table = markdown_table(rows, reference.metric)
    summary["stages_seconds"] = {k: round(v, 1) for k, v in clock.stages.items()}
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    summary["figures"] = [str(p) for p in figures]
    summary["solver_files"] = [str(out / "solvers" / solver_file_name(s)) for s in solvers]
    summary["evaluation_batch"] = str(out / "evaluation_batch.safetensors")
    summary["settings"] = {**cfg.__dict__, "model": em.name, "nfe": nfes, "seed": seed, "quick": quick,
                           "gt_tol": truth.tol, "threads": torch.get_num_threads(), "guidance": em.guidance}
    lines = _summary_lines(summary)
    publish(out, rows, summary, table, lines, say)
    say(f"wrote {out / 'results.md'}, {out / 'results.json'}, {len(figures)} figures and "
        f"{len(solvers)} solver files to {out}/")
    return summary


def _steps(total: int, desc: str, progress: bool):
    """A progress bar over a few named steps of a stage."""
    return tqdm(total=total, desc=desc, unit=" step", disable=not progress)


# -- stages -------------------------------------------------------------------------------------------

def solver_file_name(solver) -> str:
    """``<method>-nfe<NFE>.safetensors`` (bespoke-rk2, bespoke-rk1, bespoke-ns): how the demo (and the bench,
    which reuses them) names solvers."""
    return f"{solver.method}-nfe{solver.nfe}.safetensors"


FAMILIES = ("bespoke-rk2", "bespoke-rk1", "bespoke-ns")


def _fresh_solver(family: str, nfe: int, cfg: Preset):
    if family == "bespoke-ns":
        return NonStationarySolver(nfe, cfg.ns_base)
    order = int(family[-1])
    return BespokeSolver(nfe // order, order)


def train_one(em, family: str, nfe: int, cfg: Preset, seed: int, cache_dir, progress: bool, gt: str = "cached"):
    """One fresh solver of ``family`` at ``nfe``, trained with the preset's budget for that family (the
    demo's training call; the bench's training-cost stage varies ``gt``)."""
    conditions = getattr(em, "conditions", None)
    solver = _fresh_solver(family, nfe, cfg)
    budget = cfg.budget(family)
    train(em.velocity, solver, shape=em.shape, seed=seed, **budget, gt=gt,
          cache_dir=cache_dir, cache_samples=cfg.cache_samples, cache_grid=cfg.cache_grid,
          cache_shard_size=cfg.cache_samples, gt_group_size=cfg.cache_samples, val_size=cfg.val_size,
          val_every=budget["iterations"], keep_best=False, progress=progress,
          **({"conditions": conditions} if conditions else {}))
    return solver


def train_solvers(em, nfes: Sequence[int], cfg: Preset, seed: int, cache_dir, out: Path, progress: bool,
                  families: Sequence[str] = FAMILIES):
    """Each family's solver (Bespoke order 2 and 1, non-stationary) for each NFE, sharing one ground-truth
    cache (built by the first training); saved to <out>/solvers/.

    ``em``: a DemoModel (or any object with ``name``, ``velocity``, ``shape`` and ``card``; with
    ``conditions``, the solvers are trained for that pool of per-sample model inputs).
    Returns (solvers, training wall-clock, of which ground truth), in seconds; each solver's own cost is in
    its ``history`` (wall_seconds, gt_seconds).
    """
    guidance = getattr(em, "guidance", None)
    folder = out / "solvers"
    folder.mkdir(exist_ok=True)
    solvers, wall, gt = [], 0.0, 0.0
    for n in nfes:
        for family in families:
            solver = train_one(em, family, n, cfg, seed, cache_dir, progress)
            wall += solver.history.wall_seconds
            gt += solver.history.gt_seconds
            solver.save(folder / solver_file_name(solver), metadata={
                "model": em.name, "model_weights_sha256": em.card["weights"]["sha256"], "demo_seed": seed,
                **({"guidance": guidance} if guidance is not None else {})})
            solvers.append(solver)
    return solvers, wall, gt


def baseline_runs(nfes: Sequence[int], cfg: Preset, labels: Dict[str, str]) -> Iterator:
    """Every baseline run: its sweep and the requested NFEs, where the method can make exactly that
    many evaluations (midpoint and DPM-Solver++(2M), which the summary compares with, on the dense sweep)."""
    for method, (_, per_step) in BASELINES.items():
        sweep = cfg.sweep if method in ("midpoint", "dpm++2m") else cfg.sparse_sweep
        for n in sorted(set(sweep) | set(nfes)):
            if n % per_step == 0:
                yield baseline_run(method, n, labels[method])


def row_order(r: Row):
    """Sort key of the table's rows: non-stationary, Bespoke order 2 and 1, the baselines, dopri5; by NFE
    within each."""
    order = ["bespoke-ns", "bespoke-rk2", "bespoke-rk1", *BASELINES, "dopri5"]
    return (order.index(r.method), r.nfe)


# -- summary -----------------------------------------------------------------------------------------

def _find(rows, method, nfe) -> Optional[Row]:
    return next((r for r in rows if r.method == method and r.nfe == nfe), None)


def _gain_error(samples, truth, ours, theirs) -> float:
    """Standard error of a PSNR gain over the batch: the samples are paired (same noise), so it is
    the spread of the per-sample differences in dB over sqrt(batch)."""
    diff = metrics.per_sample_psnr(samples[ours], truth) - metrics.per_sample_psnr(samples[theirs], truth)
    return float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else math.nan


def pretraining_reference(em, quick: bool, clock, say) -> dict:
    """The model's pretraining wall-clock that training costs are shared against: its pretraining loop
    replayed now (``models.pretraining_replay``: same machine speed and thread count as the training just
    timed), or, in a quick run, the card's figure (measured once, under that day's load)."""
    card = em.card.get("training", {})
    card_seconds = card.get("wall_clock_seconds")
    now = None
    if not quick and card_seconds:
        from ..models.pretraining_replay import replay

        say("timing a few pretraining iterations, so that training cost compares with pretraining at this speed")
        with clock.stage("pretraining replay"):
            now = replay(em.card.get("name", em.name), em.card)
    if now is not None:
        return {"seconds": round(now["seconds"], 1), "cpu_seconds": round(now["cpu_seconds"], 1), "source": "replayed",
                "card_seconds": card_seconds}
    return {"seconds": card_seconds, "cpu_seconds": card.get("cpu_seconds"), "source": "card",
            "card_seconds": card_seconds}


def pretraining_words(s: dict) -> str:
    """Where a summary's pretraining figure came from, for its cost line."""
    if s["pretraining_source"] == "replayed":
        return f"its loop replayed in this run, at this run's speed; the card says {s['pretraining_card_seconds']:.0f} s"
    return "from its card"


def _summarise(em, rows, samples, truth, nfes, solvers, train_seconds, gt_seconds, pretraining, reference, labels,
               quick) -> dict:
    midpoint_curve = [(r.nfe, r.rmse) for r in rows if r.method == "midpoint"]
    pretrain = pretraining["seconds"]
    comparisons = []

    def own_cost(method, n):
        """A solver's cost as if trained alone: its iterations plus the shared cache's ground truth."""
        solver = next(s for s in solvers if s.method == method and s.nfe == n)
        cost = solver.history.wall_seconds - solver.history.gt_seconds + gt_seconds
        return {"training_seconds": round(cost, 1), "training_cost_fraction": cost / pretrain if pretrain else None}

    for n in nfes:
        b = _find(rows, "bespoke-rk2", n)
        mid, dpm = _find(rows, "midpoint", n), _find(rows, "dpm++2m", n)
        match, how = nfe_to_match(midpoint_curve, b.rmse)
        c = {
            "nfe": n, "bespoke_rk2_psnr": b.psnr, "bespoke_rk2_rmse": b.rmse,
            "midpoint_psnr": mid.psnr, "dpm_psnr": dpm.psnr,
            "gain_over_midpoint_db": b.psnr - mid.psnr, "gain_over_dpm_db": b.psnr - dpm.psnr,
            "gain_over_midpoint_se_db": _gain_error(samples, truth, ("bespoke-rk2", n), ("midpoint", n)),
            "gain_over_dpm_se_db": _gain_error(samples, truth, ("bespoke-rk2", n), ("dpm++2m", n)),
            "midpoint_nfe_to_match": match, "midpoint_nfe_to_match_how": how,
            **{f"bespoke_rk2_{k}": v for k, v in own_cost("bespoke-rk2", n).items()},
        }
        ns = _find(rows, "bespoke-ns", n)
        if ns is not None:
            twice = _find(rows, "midpoint", 2 * n)
            match, how = nfe_to_match(midpoint_curve, ns.rmse)
            c["nonstationary"] = {
                "psnr": ns.psnr, "rmse": ns.rmse, "gain_over_midpoint_db": ns.psnr - mid.psnr,
                "gain_over_midpoint_se_db": _gain_error(samples, truth, ("bespoke-ns", n), ("midpoint", n)),
                "gain_over_rk2_db": ns.psnr - b.psnr, "rmse_over_rk2": ns.rmse / b.rmse,
                "rmse_over_midpoint_twice_nfe": ns.rmse / twice.rmse if twice else None,
                "midpoint_nfe_to_match": match, "midpoint_nfe_to_match_how": how,
                **own_cost("bespoke-ns", n),
            }
        comparisons.append(c)
    return {
        "model": em.name,
        "dpm_label": labels["dpm++2m"],
        "distribution_metric": reference.metric,
        "distribution_floor": reference.floor,
        "comparisons": comparisons,
        "training_seconds": round(train_seconds, 1),
        "training_gt_seconds": round(gt_seconds, 1),
        "pretraining_seconds": pretrain,
        "pretraining_source": pretraining["source"],
        "pretraining_card_seconds": pretraining["card_seconds"],
        "training_cost_fraction": (train_seconds / pretrain) if pretrain else None,
        "quick": quick,
    }


def _match_words(match, how, nfe: int) -> str:
    if match is not None and how in ("interpolated", "measured"):
        return f"midpoint needs about {match:.1f} evaluations for the same RMSE, {match / nfe:.1f}x as many"
    if match is not None:
        return f"midpoint would need about {match:.1f} evaluations for the same RMSE ({how})"
    return f"midpoint does not reach its RMSE ({how})"


def _summary_lines(s: dict) -> List[str]:
    """What the table says, in words a user can act on."""
    lines = ["RMSE and PSNR compare each solver's samples with the ground truth from the same noise: "
             "lower RMSE / higher PSNR means closer to what the model's exact ODE solution would give."]
    for c in s["comparisons"]:
        speed = _match_words(c["midpoint_nfe_to_match"], c["midpoint_nfe_to_match_how"], c["nfe"])
        fraction = c.get("bespoke_rk2_training_cost_fraction")
        speed += (f"; trained in {c['bespoke_rk2_training_seconds']:.0f} s with its ground truth, "
                  f"{100 * fraction:.1f}% of pretraining" if fraction else "")
        lines.append(f"NFE {c['nfe']}: the Bespoke solver (order 2) reaches PSNR {c['bespoke_rk2_psnr']:.2f} dB, "
                     f"{c['gain_over_midpoint_db']:+.2f} +- {c['gain_over_midpoint_se_db']:.2f} dB over midpoint and "
                     f"{c['gain_over_dpm_db']:+.2f} +- {c['gain_over_dpm_se_db']:.2f} dB over {s['dpm_label']} "
                     f"at the same NFE (+- one standard error over the batch); {speed}")
        ns = c.get("nonstationary")
        if ns:
            twice = (f", {ns['rmse_over_midpoint_twice_nfe']:.2f}x the RMSE of midpoint at NFE {2 * c['nfe']}"
                     if ns["rmse_over_midpoint_twice_nfe"] is not None else "")
            cost = (f"; trained in {ns['training_seconds']:.0f} s with its ground truth, "
                    f"{100 * ns['training_cost_fraction']:.1f}% of pretraining" if ns["training_cost_fraction"] else "")
            lines.append(f"NFE {c['nfe']}: the non-stationary solver reaches PSNR {ns['psnr']:.2f} dB, "
                         f"{ns['gain_over_midpoint_db']:+.2f} +- {ns['gain_over_midpoint_se_db']:.2f} dB over midpoint, "
                         f"{ns['rmse_over_rk2']:.2f}x the RMSE of Bespoke order 2{twice}; "
                         f"{_match_words(ns['midpoint_nfe_to_match'], ns['midpoint_nfe_to_match_how'], c['nfe'])}{cost}")
    if s["distribution_floor"] is not None:
        n = s["settings"]["batch"]
        lines.append(f"{s['distribution_metric']} compares samples with real data (lower is better); {n} real "
                     f"samples score {s['distribution_floor']:.3f} against the same reference, the best a batch of "
                     f"this size can read (small batches bias it upward)")
    if s["training_cost_fraction"] is not None:
        lines.append(f"training all {len(s['solver_files'])} solvers took {s['training_seconds']:.0f} s, ground "
                     f"truth included ({s['training_gt_seconds']:.0f} s): {100 * s['training_cost_fraction']:.1f}% of "
                     f"the model's pretraining ({s['pretraining_seconds']:.0f} s, {pretraining_words(s)})")
    return lines + closing_lines(s)


def publish(out: Path, rows, summary: dict, table: str, lines: List[str], say) -> None:
    """results.md / results.json (the table and the summary lines), and the same printed."""
    write_results(out, rows, summary, table + "\n\n" + "\n".join(f"- {line}" for line in lines))
    say()
    say(table)
    say()
    for line in lines:
        say(line)


def closing_lines(s: dict) -> List[str]:
    """The summary's last lines (this demo's and the pipeline demo's): wall-clock per stage, quick-run caveat."""
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in s["stages_seconds"].items())
    threads = s["settings"]["threads"]
    lines = [f"wall-clock: {stages}; total {s['total_seconds']:.0f} s on {threads} thread{'s' if threads != 1 else ''}"]
    if s["quick"]:
        lines.append("quick run: tiny batch and training, the numbers above only show that everything runs")
    return lines


def _figures(out: Path, em, x0, samples, rows, solvers, nfes, summary, labels, progress: bool) -> List[Path]:
    top = max(nfes)
    truth_key = next(k for k in samples if k[0] == "ground truth")
    panels = [(f"ground truth\n(NFE {truth_key[1]})", samples[truth_key])]
    for method, name in (("bespoke-ns", "Bespoke NS"), ("bespoke-rk2", "Bespoke o2"), ("bespoke-rk1", "Bespoke o1")):
        if (method, top) in samples:
            panels.append((f"{name}\nNFE {top}", samples[(method, top)]))
    for method in BASELINES:
        if (method, top) in samples:
            panels.append((f"{labels[method].split(',')[0]}\nNFE {top}", samples[(method, top)]))
    panels.append(("noise x0", x0))

    curves: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        if r.method in BASELINES:
            curves.setdefault(labels[r.method], []).append((r.nfe, r.rmse))
    points = {f"{solver_label(s)}, NFE {s.nfe}": (s.nfe, _find(rows, s.method, s.nfe).rmse) for s in solvers}
    top_cmp = next(c for c in summary["comparisons"] if c["nfe"] == top)
    match = None
    if top_cmp["midpoint_nfe_to_match"] is not None:
        match = (f"midpoint matches Bespoke NFE {top} at NFE ~{top_cmp['midpoint_nfe_to_match']:.1f}",
                 top_cmp["midpoint_nfe_to_match"], top_cmp["bespoke_rk2_rmse"])

    scale_time = {f"order {s.order}, NFE {s.nfe}": s for s in solvers if isinstance(s, BespokeSolver)}
    nonstationary = {f"NFE {s.nfe}": s for s in solvers if isinstance(s, NonStationarySolver)}
    paths = [out / "samples.png", out / "rmse_vs_nfe.png", out / "bespoke_schedules.png"]
    if nonstationary:
        paths.append(out / "nonstationary_schedules.png")
    with _steps(len(paths), "drawing figures", progress) as bar:
        save_sample_grid(panels, paths[0], title=f"{em.name}: the same noise through each solver")
        bar.update(1)
        save_error_curves(curves, points, paths[1], match=match, title=f"{em.name}: RMSE against ground truth")
        bar.update(1)
        save_schedules(scale_time, paths[2], title=f"{em.name}: learned Bespoke time and scale")
        bar.update(1)
        if nonstationary:
            save_nonstationary(nonstationary, paths[3], title=f"{em.name}: learned non-stationary solvers")
            bar.update(1)
    return paths


def _label_grid(out: Path, em: DemoModel, samples, labels, nfe: int) -> Path:
    """The order-2 Bespoke solver's samples at the top NFE, a row per label."""
    x = samples[("bespoke-rk2", nfe)]
    per = min(int((labels == c).sum()) for c in range(em.num_classes))
    panels = [(f"label {c}", x[labels == c][:per]) for c in range(em.num_classes)]
    path = out / "samples_per_label.png"
    save_sample_grid(panels, path, title=f"{em.name}: Bespoke order 2, NFE {nfe}, guidance g = {em.guidance:g}")
    return path

