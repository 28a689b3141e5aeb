"""``bespoke-ext demo``: the whole method on an embedded model, against the solvers a user would pick.

Stages (each timed; tqdm bars on the slow ones):
    1. load       the embedded model, its digit classifier (image models) and held-out real data
    2. truth      ground truth x(1) for a fixed evaluation batch: dopri5 at rtol = atol = 1e-5
    3. train      Bespoke solvers for each requested NFE, order 2 (midpoint base) and order 1 (Euler
                  base), on cached ground truth of separate noise (built once, shared by all four)
    4. evaluate   every solver on the evaluation batch: Euler, midpoint, Heun, RK4, DPM-Solver++(2M)
                  over a sweep of NFEs, dopri5 at a loose tolerance, the Bespoke solvers; RMSE and
                  PSNR against ground truth, FCD (image models) or sliced Wasserstein (2-D) against
                  real data, wall-clock per batch
    5. report     results.md / results.json, the trained solver files, the evaluation batch (x0 and
                  its ground truth, evaluation_batch.safetensors), figures (samples.png,
                  rmse_vs_nfe.png, bespoke_schedules.png), and a summary: the NFE midpoint needs to
                  match each order-2 Bespoke solver, the targets, and training cost (ground truth
                  included) as a fraction of the model's pretraining wall-clock.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..models import data as data_mod
from ..models.embedded import DEFAULT_MODEL, list_embedded, load_embedded
from ..sampling import sample
from ..solvers import BespokeSolver
from ..training import train
from ..training.batches import derive_seed
from . import metrics
from .classifier import classifier_for_data, load_classifier
from .plots import save_error_curves, save_sample_grid, save_schedules
from .report import Row, markdown_table, nfe_to_match, write_results

__all__ = ["add_demo_arguments", "run_demo", "run", "DEMO_PRESETS", "GT_TOL", "BASELINES", "baseline_labels"]

GT_TOL = 1e-5  # method.md §1: ground truth at rtol = atol = 1e-5 or tighter
LOOSE_TOL = 1e-3  # the dopri5 row: what an adaptive solver costs at an error comparable to the others

# method -> (label, model evaluations per step): a sweep NFE is used where it is a whole number of steps
BASELINES = {
    "euler": ("Euler", 1),
    "midpoint": ("midpoint", 2),
    "heun": ("Heun", 2),
    "rk4": ("RK4", 4),
    "dpm++2m": ("DPM-Solver++(2M)", 1),
}


def baseline_labels(card: dict) -> Dict[str, str]:
    """Table labels of the baselines for a model. The package's DPM-Solver++(2M) is written for the OT
    path (solvers/dpm_solver.py): on a model of another path it is still a consistent second-order
    multistep method, but not that path's dedicated solver, and its label says so."""
    labels = {m: label for m, (label, _) in BASELINES.items()}
    path = (card.get("schedule") or {}).get("name", "ot")
    if path != "ot":
        labels["dpm++2m"] = f"DPM-Solver++(2M), OT form on a {path.upper()} model"
    return labels


@dataclass(frozen=True)
class Preset:
    """Defaults of one model's demo, chosen by timing each stage on 2 busy CPU cores (README, Demo).

    batch: evaluation samples (noise, ground truth, every solver, the distribution metric).
    loss, iterations, train_batch, lr: Bespoke training. The end-to-end loss (method.md §5, the
        follow-up paper's) from the identity, with the trainer's cosine decay and clipping: on the
        MNIST model at NFE 10 (order 2, 32 held-out samples) 60 iterations of it gained 3.0 dB over
        midpoint where the paper's bound loss gained 0.6 dB. 100 iterations of 4 pairs gained as
        much as 120 of 8 (3.8 and 3.6 dB at lr 2e-2) for a third of the cost.
    cache_samples, cache_grid: ground-truth trajectories (the training pairs) and their grid intervals
        (for MNIST, 128 pairs gained no more than 64 at 60 iterations).
    val_size: noise samples of training's own validation, which is solved anew by every training
        run and only logged: the demo judges every solver on its own evaluation batch instead.
    sweep: baseline NFEs of midpoint and DPM-Solver++(2M), the solvers the targets compare with;
        sparse_sweep: those of Euler, Heun and RK4. Both also get the requested NFEs.
    """

    batch: int
    iterations: int
    train_batch: int
    lr: float
    cache_samples: int
    cache_grid: int
    sweep: Tuple[int, ...]
    sparse_sweep: Tuple[int, ...]
    loss: str = "end_to_end"
    val_size: int = 1


_SWEEP = dict(sweep=(4, 6, 8, 10, 12, 16, 20), sparse_sweep=(4, 8, 12, 16))
DEMO_PRESETS: Dict[str, Preset] = {
    "mnist": Preset(batch=64, iterations=100, train_batch=4, lr=2e-2, cache_samples=64, cache_grid=16, **_SWEEP),
    "digits_vp": Preset(batch=256, iterations=60, train_batch=16, lr=1e-2, cache_samples=128, cache_grid=16, **_SWEEP),
    "moons2d": Preset(batch=1024, iterations=100, train_batch=128, lr=1e-2, cache_samples=1024, cache_grid=16,
                      **_SWEEP),
}
_FALLBACK = DEMO_PRESETS["mnist"]
# --quick: a smoke run (minutes become seconds; the numbers are then not meaningful)
_QUICK = dict(batch=16, iterations=4, train_batch=4, cache_samples=16, cache_grid=8, sweep=(4, 8, 10), sparse_sweep=(4, 8))
LOSSES = ("end_to_end", "bound")


# -- command line -----------------------------------------------------------------------------------

def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``bespoke-ext demo``."""
    parser.add_argument("--model", default=None,
                        help="embedded model (default: the shipped MNIST model); see `bespoke-ext info`")
    parser.add_argument("--nfe", type=int, nargs="+", default=[8, 10], metavar="N",
                        help="NFEs to train Bespoke solvers for, each even (order 2 takes 2 per step); default 8 10")
    parser.add_argument("--out", default="bespoke-demo", help="output folder (default ./bespoke-demo)")
    parser.add_argument("--batch", type=int, default=None, help="evaluation batch size (default: the model's preset)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per solver (default: preset)")
    parser.add_argument("--loss", choices=LOSSES, default=None,
                        help="Bespoke training loss: end_to_end (default) or bound (the paper's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise and of training (default 0)")
    parser.add_argument("--quick", action="store_true", help="a reduced smoke run: tiny batch and training")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: half the cores, at least 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; prints the table and summary. Returns 0."""
    run(model=args.model, nfe=args.nfe, out=args.out, batch=args.batch, iterations=args.iterations, loss=args.loss,
        seed=args.seed, quick=args.quick, progress=not args.no_progress, threads=args.threads)
    return 0


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


def _settings(model_name: str, batch, iterations, loss, quick: bool) -> Preset:
    preset = DEMO_PRESETS.get(model_name, _FALLBACK)
    if quick:
        preset = Preset(**{**preset.__dict__, **_QUICK})
    for name, value in (("--batch", batch), ("--iterations", iterations)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if loss is not None and loss not in LOSSES:
        raise ValueError(f"--loss must be one of {LOSSES}, got {loss!r}")
    changes = {k: v for k, v in (("batch", batch), ("iterations", iterations), ("loss", loss)) if v is not None}
    return Preset(**{**preset.__dict__, **changes})


def _check_nfes(nfe: Sequence[int]) -> List[int]:
    values = sorted(set(nfe))
    if not values or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 or n % 2 for n in values):
        raise ValueError(f"--nfe values must be even integers >= 2 (an order-2 solver spends 2 evaluations "
                         f"per step), got {list(nfe)}")
    return values


def run(model: Optional[str] = None, nfe: Sequence[int] = (8, 10), out="bespoke-demo", *, batch: Optional[int] = None,
        iterations: Optional[int] = None, loss: Optional[str] = None, seed: int = 0, quick: bool = False, progress: bool = True,
        threads: Optional[int] = None, stream=None) -> dict:
    """The demo as a function: returns the summary dict (also in ``<out>/results.json``).

    ``threads``: torch CPU threads for the run (restored after). Default half the cores: the models
    are small, and where other processes share the cores, oversubscribed threads spin at every
    parallel region; measured on 2 busy cores, the MNIST model ran 4x slower per sample at 2 threads
    than at 1 (the 2-D model 25x).
    ``stream`` receives the printed report (default sys.stdout); progress bars go to stderr.
    """
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        return _run(model, nfe, out, batch, iterations, loss, seed, quick, progress, stream)
    finally:
        torch.set_num_threads(before)


def _run(model, nfe, out, batch, iterations, loss, seed, quick, progress, stream) -> dict:
    stream = stream or sys.stdout
    say = lambda text="": print(text, file=stream, flush=True)
    name = model or DEFAULT_MODEL
    if name not in list_embedded():
        raise ValueError(f"--model must be one of the embedded models {list_embedded()}, got {name!r}")
    nfes = _check_nfes(nfe)
    cfg = _settings(name, batch, iterations, loss, quick)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    started = time.perf_counter()

    with clock.stage("load"), _steps(2, "loading the model and real data", progress) as bar:
        em = load_embedded(name)
        bar.update(1)
        reference = _Reference.for_model(em, cfg.batch, seed)
        bar.update(1)
    say(f"model {em.name}: {em.card.get('description', '')}")
    say(f"evaluation batch {cfg.batch}, Bespoke NFEs {nfes}, {cfg.iterations} training iterations per solver "
        f"({cfg.loss.replace('_', '-')} loss)"
        f"{' (quick run: numbers not meaningful)' if quick else ''}")

    g = torch.Generator().manual_seed(_stream_seed(seed, "demo-evaluation"))
    x0 = torch.randn(cfg.batch, *em.shape, generator=g, dtype=em.dtype)
    with clock.stage("ground truth"):
        truth, truth_nfe, truth_seconds = _ground_truth(em.velocity, x0, progress)
    # kept, so that any row of the table can be recomputed from the saved solvers
    save_file({"x0": x0.contiguous(), "ground_truth": truth.contiguous()}, str(out / "evaluation_batch.safetensors"))

    with clock.stage("train"), tempfile.TemporaryDirectory(prefix="bespoke-demo-gt-") as cache_dir:
        solvers, train_seconds, gt_seconds = _train_solvers(em, nfes, cfg, seed, cache_dir, out, progress)

    labels = baseline_labels(em.card)
    with clock.stage("evaluate"):
        rows, samples = _evaluate(em.velocity, x0, truth, truth_nfe, truth_seconds, solvers, nfes, cfg, reference,
                                  labels, progress)

    with clock.stage("report"):
        summary = _summarise(em, rows, samples, truth, nfes, train_seconds, gt_seconds, reference, labels, quick)
        figures = _figures(out, em, x0, samples, rows, solvers, nfes, summary, labels, progress)
        table = markdown_table(rows, reference.metric)
    summary["stages_seconds"] = {k: round(v, 1) for k, v in clock.stages.items()}
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    summary["figures"] = [str(p) for p in figures]
    summary["solver_files"] = [str(out / "solvers" / _solver_file(s)) for s in solvers]
    summary["evaluation_batch"] = str(out / "evaluation_batch.safetensors")
    summary["settings"] = {**cfg.__dict__, "model": em.name, "nfe": nfes, "seed": seed, "quick": quick,
                           "gt_tol": GT_TOL, "threads": torch.get_num_threads()}
    lines = _summary_lines(summary)
    write_results(out, rows, summary, table + "\n\n" + "\n".join(f"- {line}" for line in lines))
    say()
    say(table)
    say()
    for line in lines:
        say(line)
    say(f"wrote {out / 'results.md'}, {out / 'results.json'}, {len(figures)} figures and "
        f"{len(solvers)} solver files to {out}/")
    return summary


def _steps(total: int, desc: str, progress: bool):
    """A progress bar over a few named steps of a stage."""
    return tqdm(total=total, desc=desc, unit=" step", disable=not progress)


def _stream_seed(seed: int, stream: str) -> int:
    """The seed of a named random stream of the demo (evaluation noise, reference data): independent
    of training's streams, which derive_seed names differently."""
    return derive_seed(seed, stream)


# -- stage helpers -----------------------------------------------------------------------------------

@dataclass
class _Reference:
    """Real data and the distribution-level metric for a model: FCD in a digit classifier's feature
    space (image models with a classifier) or sliced Wasserstein (2-D models); none otherwise.

    ``floor``: the metric between ``batch`` further real samples and the reference. Both metrics
    are biased upward at small sample counts (the FCD strongly: 64-d covariances from a few dozen
    samples), so the floor shows what "as good as real data" reads at the demo's batch size.
    """

    metric: Optional[str]
    data: Optional[torch.Tensor] = None
    classifier: Optional[torch.nn.Module] = None
    features: Optional[torch.Tensor] = None
    floor: Optional[float] = None

    @classmethod
    def for_model(cls, em, batch: int, seed: int) -> "_Reference":
        data_name = em.card.get("data", {}).get("name")
        if len(em.shape) == 1 and em.shape[0] == 2 and data_name in data_mod.DATASETS:
            # fresh points from the data distribution, on seeds of their own (pretraining drew its
            # data from seeds 0 and 1)
            pts = data_mod.load_dataset(data_name, n=max(4 * batch, 2048),
                                        seed=_stream_seed(seed, "demo-reference") % 2 ** 31)
            ref = cls(metric="SWD", data=pts)
            more = data_mod.load_dataset(data_name, n=batch, seed=_stream_seed(seed, "demo-floor") % 2 ** 31)
        else:
            clf_name = classifier_for_data(data_name) if data_name else None
            if clf_name is None:
                return cls(metric=None)
            clf = load_classifier(clf_name)
            heldout = data_mod.load_dataset(data_name, split="test")  # seen by neither the model nor the classifier
            with torch.no_grad():
                feats = clf.features(heldout)
            ref = cls(metric="FCD", data=heldout, classifier=clf, features=feats)
            train = data_mod.load_dataset(data_name, split="train")
            g = torch.Generator().manual_seed(_stream_seed(seed, "demo-floor"))
            more = train[torch.randperm(len(train), generator=g)[:batch]]  # the split is sorted by class
        ref.floor = ref.distance(more)[ref.metric]
        return ref

    def distance(self, samples: torch.Tensor) -> Optional[Dict[str, float]]:
        if self.metric == "SWD":
            return {"SWD": metrics.sliced_wasserstein(samples.reshape(samples.shape[0], -1), self.data)}
        if self.metric == "FCD":
            with torch.no_grad():
                feats = self.classifier.features(samples.float().clamp(-1, 1))
            return {"FCD": metrics.frechet_distance(feats, self.features)}
        return None


class _CountingField:
    """The velocity field, advancing a progress bar once per evaluation (the adaptive solver's NFE
    is not known in advance, so the bar counts up)."""

    def __init__(self, field, bar):
        self.field, self.bar = field, bar

    def __call__(self, x, t, **extras):
        self.bar.update(1)
        return self.field(x, t, **extras)


def _ground_truth(velocity, x0, progress: bool):
    with tqdm(desc=f"ground truth (dopri5, tol {GT_TOL:g})", unit=" NFE", disable=not progress) as bar:
        start = time.perf_counter()
        truth, stats = sample(_CountingField(velocity, bar), x0, method="dopri5", atol=GT_TOL, rtol=GT_TOL,
                              return_stats=True)
        seconds = time.perf_counter() - start
    return truth, stats.nfe, seconds


def _solver_file(solver) -> str:
    return f"bespoke-rk{solver.order}-nfe{solver.nfe}.safetensors"


def _train_solvers(em, nfes, cfg: Preset, seed: int, cache_dir, out: Path, progress: bool):
    """Order 2 and order 1 for each NFE, sharing one ground-truth cache; saved to <out>/solvers/."""
    folder = out / "solvers"
    folder.mkdir(exist_ok=True)
    solvers, wall, gt = [], 0.0, 0.0
    for n in nfes:
        for order in (2, 1):
            solver = BespokeSolver(n // order, order)
            train(em.velocity, solver, shape=em.shape, iterations=cfg.iterations, batch_size=cfg.train_batch,
                  seed=seed, loss=cfg.loss, lr=cfg.lr, gt="cached", cache_dir=cache_dir,
                  cache_samples=cfg.cache_samples, cache_grid=cfg.cache_grid, cache_shard_size=cfg.cache_samples,
                  gt_group_size=cfg.cache_samples, val_size=cfg.val_size, val_every=cfg.iterations, keep_best=False,
                  progress=progress)
            wall += solver.history.wall_seconds
            gt += solver.history.gt_seconds
            solver.save(folder / _solver_file(solver), metadata={
                "model": em.name, "model_weights_sha256": em.card["weights"]["sha256"], "demo_seed": seed})
            solvers.append(solver)
    return solvers, wall, gt


def _runs(nfes, cfg: Preset):
    """(method, nfe) of every baseline run: its sweep and the requested NFEs, where the method can
    make exactly that many evaluations."""
    for method, (_, per_step) in BASELINES.items():
        sweep = cfg.sweep if method in ("midpoint", "dpm++2m") else cfg.sparse_sweep
        for n in sorted(set(sweep) | set(nfes)):
            if n % per_step == 0:
                yield method, n


def _evaluate(velocity, x0, truth, truth_nfe, truth_seconds, solvers, nfes, cfg: Preset, reference: _Reference,
              labels: Dict[str, str], progress: bool):
    def row(method, label, nfe, x, seconds):
        return Row(method=method, label=label, nfe=int(nfe), rmse=metrics.rmse(x, truth), psnr=metrics.psnr(x, truth),
                   seconds=seconds, distribution=reference.distance(x))

    rows = [row("ground truth", f"ground truth (dopri5, tol {GT_TOL:g})", truth_nfe, truth, truth_seconds)]
    samples = {("ground truth", truth_nfe): truth}
    jobs = [("bespoke", s) for s in solvers] + [("dopri5", None)] + [(m, n) for m, n in _runs(nfes, cfg)]
    for kind, what in tqdm(jobs, desc="evaluating solvers", unit=" run", disable=not progress):
        start = time.perf_counter()
        if kind == "bespoke":
            x = sample(velocity, x0, solver=what)
            method, label, nfe = what.method, f"Bespoke order {what.order}", what.nfe
        elif kind == "dopri5":
            x, stats = sample(velocity, x0, method="dopri5", atol=LOOSE_TOL, rtol=LOOSE_TOL, return_stats=True)
            method, label, nfe = "dopri5", f"dopri5 (tol {LOOSE_TOL:g})", stats.nfe
        else:
            x = sample(velocity, x0, method=kind, nfe=what)
            method, label, nfe = kind, labels[kind], what
        seconds = time.perf_counter() - start
        rows.append(row(method, label, nfe, x, seconds))
        samples[(method, nfe)] = x
    rows = rows[:1] + sorted(rows[1:], key=_row_order)
    return rows, samples


def _row_order(r: Row):
    order = ["bespoke-rk2", "bespoke-rk1", *BASELINES, "dopri5"]
    return (order.index(r.method), r.nfe)


# -- summary -----------------------------------------------------------------------------------------

def _find(rows, method, nfe) -> Optional[Row]:
    return next((r for r in rows if r.method == method and r.nfe == nfe), None)


def _gain_error(samples, truth, ours, theirs) -> float:
    """Standard error of a PSNR gain over the batch: the samples are paired (same noise), so it is
    the spread of the per-sample differences in dB over sqrt(batch)."""
    diff = metrics.per_sample_psnr(samples[ours], truth) - metrics.per_sample_psnr(samples[theirs], truth)
    return float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else math.nan


def _summarise(em, rows, samples, truth, nfes, train_seconds, gt_seconds, reference, labels, quick) -> dict:
    midpoint_curve = [(r.nfe, r.rmse) for r in rows if r.method == "midpoint"]
    comparisons = []
    for n in nfes:
        b = _find(rows, "bespoke-rk2", n)
        mid, dpm = _find(rows, "midpoint", n), _find(rows, "dpm++2m", n)
        match, how = nfe_to_match(midpoint_curve, b.rmse)
        comparisons.append({
            "nfe": n, "bespoke_rk2_psnr": b.psnr, "bespoke_rk2_rmse": b.rmse,
            "midpoint_psnr": mid.psnr, "dpm_psnr": dpm.psnr,
            "gain_over_midpoint_db": b.psnr - mid.psnr, "gain_over_dpm_db": b.psnr - dpm.psnr,
            "gain_over_midpoint_se_db": _gain_error(samples, truth, ("bespoke-rk2", n), ("midpoint", n)),
            "gain_over_dpm_se_db": _gain_error(samples, truth, ("bespoke-rk2", n), ("dpm++2m", n)),
            "midpoint_nfe_to_match": match, "midpoint_nfe_to_match_how": how,
        })
    pretrain = em.card.get("training", {}).get("wall_clock_seconds")
    targets = _targets(comparisons, nfes, labels["dpm++2m"])
    return {
        "model": em.name,
        "dpm_label": labels["dpm++2m"],
        "distribution_metric": reference.metric,
        "distribution_floor": reference.floor,
        "comparisons": comparisons,
        "targets": targets,
        "training_seconds": round(train_seconds, 1),
        "training_gt_seconds": round(gt_seconds, 1),
        "pretraining_seconds": pretrain,
        "training_cost_fraction": (train_seconds / pretrain) if pretrain else None,
        "quick": quick,
    }


def _targets(comparisons, nfes, dpm_label: str) -> List[dict]:
    """Issue 5's targets at the largest requested NFE N (10 by default): Bespoke order 2 at least 3 dB
    above midpoint at N, and above DPM-Solver++(2M) at every requested NFE (8 and 10 by default)."""
    top = max(nfes)
    by_nfe = {c["nfe"]: c for c in comparisons}
    c = by_nfe[top]
    out = [{"target": f"Bespoke order 2 >= midpoint + 3 dB at NFE {top}", "value_db": c["gain_over_midpoint_db"],
            "se_db": c["gain_over_midpoint_se_db"], "met": c["gain_over_midpoint_db"] >= 3.0}]
    for n in nfes:
        c = by_nfe[n]
        out.append({"target": f"Bespoke order 2 above {dpm_label} at NFE {n}", "value_db": c["gain_over_dpm_db"],
                    "se_db": c["gain_over_dpm_se_db"], "met": c["gain_over_dpm_db"] > 0.0})
    return out


def _summary_lines(s: dict) -> List[str]:
    lines = []
    for c in s["comparisons"]:
        match = c["midpoint_nfe_to_match"]
        where = f"about {match:.1f} ({c['midpoint_nfe_to_match_how']})" if match is not None else c["midpoint_nfe_to_match_how"]
        lines.append(f"NFE {c['nfe']}: Bespoke order 2 PSNR {c['bespoke_rk2_psnr']:.2f} dB, "
                     f"{c['gain_over_midpoint_db']:+.2f} +- {c['gain_over_midpoint_se_db']:.2f} dB over midpoint, "
                     f"{c['gain_over_dpm_db']:+.2f} +- {c['gain_over_dpm_se_db']:.2f} dB over {s['dpm_label']} "
                     f"(+- one standard error over the batch); midpoint needs NFE {where} to match its RMSE on "
                     f"the RMSE-vs-NFE curve")
    for t in s["targets"]:
        lines.append(f"target {'met' if t['met'] else 'MISSED'}: {t['target']} "
                     f"({t['value_db']:+.2f} +- {t['se_db']:.2f} dB)")
    if s["distribution_floor"] is not None:
        n = s["settings"]["batch"]
        lines.append(f"{s['distribution_metric']} of {n} real samples against the same reference (the floor at this "
                     f"batch size; small batches bias it upward): {s['distribution_floor']:.3f}")
    if s["training_cost_fraction"] is not None:
        lines.append(f"training cost, ground truth included: {s['training_seconds']:.0f} s "
                     f"(ground truth {s['training_gt_seconds']:.0f} s) = {100 * s['training_cost_fraction']:.1f}% of "
                     f"the model's pretraining wall-clock ({s['pretraining_seconds']:.0f} s, from its card)")
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in s["stages_seconds"].items())
    lines.append(f"wall-clock: {stages}; total {s['total_seconds']:.0f} s on {s['settings']['threads']} threads")
    if s["quick"]:
        lines.append("quick run: tiny batch and training, the numbers above only show that everything runs")
    return lines


def _figures(out: Path, em, x0, samples, rows, solvers, nfes, summary, labels, progress: bool) -> List[Path]:
    top = max(nfes)
    truth_key = next(k for k in samples if k[0] == "ground truth")
    panels = [(f"ground truth\n(NFE {truth_key[1]})", samples[truth_key]),
              (f"Bespoke o2\nNFE {top}", samples[("bespoke-rk2", top)]),
              (f"Bespoke o1\nNFE {top}", samples[("bespoke-rk1", top)])]
    for method in BASELINES:
        if (method, top) in samples:
            panels.append((f"{labels[method].split(',')[0]}\nNFE {top}", samples[(method, top)]))
    panels.append(("noise x0", x0))

    curves: Dict[str, List[Tuple[int, float]]] = {}
    for r in rows:
        if r.method in BASELINES:
            curves.setdefault(labels[r.method], []).append((r.nfe, r.rmse))
    points = {f"Bespoke order {s.order}, NFE {s.nfe}": (s.nfe, _find(rows, s.method, s.nfe).rmse) for s in solvers}
    top_cmp = next(c for c in summary["comparisons"] if c["nfe"] == top)
    match = None
    if top_cmp["midpoint_nfe_to_match"] is not None:
        match = (f"midpoint matches Bespoke NFE {top} at NFE ~{top_cmp['midpoint_nfe_to_match']:.1f}",
                 top_cmp["midpoint_nfe_to_match"], top_cmp["bespoke_rk2_rmse"])

    paths = [out / "samples.png", out / "rmse_vs_nfe.png", out / "bespoke_schedules.png"]
    with _steps(3, "drawing figures", progress) as bar:
        save_sample_grid(panels, paths[0], title=f"{em.name}: the same noise through each solver")
        bar.update(1)
        save_error_curves(curves, points, paths[1], match=match, title=f"{em.name}: RMSE against ground truth")
        bar.update(1)
        save_schedules({f"order {s.order}, NFE {s.nfe}": s for s in solvers}, paths[2],
                       title=f"{em.name}: learned Bespoke time and scale")
        bar.update(1)
    return paths
