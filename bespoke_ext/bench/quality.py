"""Quality versus NFE: every solver on the same noise, against the same ground truth, per model.

The comparison API (bespoke_ext/compare.py: ground truth, rows, the distribution metric) and the demo's
settings, training and baseline sweep (bespoke_ext/demo/) do the work; this stage adds what a benchmark
needs beyond them: the analytic oracle as a model, diffusers' DPM-Solver++ and UniPC in flow mode on the
same noise (diffusers.py), dopri5 at more than one tolerance, reuse of trained solver files, and the
quality targets read off the rows.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import demo
from ..compare import BASELINES, Reference, Row, Run, baseline_labels, compare, dopri5_run, ground_truth, solver_run
from ..compare import stream_seed
from .diffusers import SCHEDULERS, diffusers_missing, diffusers_sample

__all__ = ["QualityModel", "oracle_model", "quality_models", "weights_id", "run_quality", "settings",
           "evaluation_noise", "solver_search_path", "find_solver", "quality_targets", "nonstationary_targets",
           "guided_targets", "guided_variants", "guided_model", "BESPOKE_NFES", "FIXED_METHODS"]

BESPOKE_NFES = (10, 20)  # the targets' NFEs; order 1 and order 2 at each
QUICK_BESPOKE_NFES = (10,)
DOPRI5_TOLS = (1e-2, 1e-4)  # with the demo's 1e-3 row: a short error-vs-NFE curve for the adaptive solver
ORACLE = dict(dim=64, components=10, std=0.1, seed=0, shape=(1, 8, 8))  # sharp: low NFE visibly off
# The oracle is cheap to evaluate: a larger batch and cache than the demo's default (MNIST) settings.
# Non-stationary at NFE 10 on it (log-MSE, Euler base, lr 1e-2, 64 pairs a step; RMSE over midpoint's): 300
# iterations 0.28x, lr 5e-3 0.45x, end-to-end loss 0.46x, midpoint base 0.51x; 600 iterations 0.64x (lr 2e-2:
# 1.02x): on this sharp mixture longer runs without a validation set drift (the prototype: 0.54-0.64x).
ORACLE_SETTINGS = dict(batch=512, train_batch=64, cache_samples=512, ns_iterations=300, ns_train_batch=64)
# Fixed-NFE solvers that the "Bespoke order 2 ahead at NFE 10" target compares against.
FIXED_METHODS = ("bespoke-rk1", *BASELINES, *SCHEDULERS)


@dataclass
class QualityModel:
    """What the demo's helpers need from a model: its name, velocity field, per-sample shape, dtype and
    card (``card["weights"]["sha256"]`` identifies the weights that solver files were trained for)."""

    name: str
    velocity: Callable
    shape: Tuple[int, ...]
    card: dict
    dtype: torch.dtype = torch.float32
    overrides: Optional[dict] = None  # changes to the demo's settings (full runs only)
    embedded: bool = True             # the quality target names the embedded models; the oracle informs
    preset: Optional[str] = None      # the demo preset's name, where it is not ``name`` (guided variants)
    guidance: Optional[float] = None  # classifier-free guidance g of a guided variant (see guided_model)
    conditions: Optional[Dict[str, torch.Tensor]] = None  # the label pool training draws from (demo.DemoModel's)
    eval_extras: Optional[Callable[[int], Dict[str, torch.Tensor]]] = None  # the evaluation batch's labels

    def extras(self, batch: int) -> Dict[str, torch.Tensor]:
        return self.eval_extras(batch) if self.eval_extras else {}


# Guided variants of the class-conditional embedded models, benched at the guidance scales issue 11 names.
GUIDANCE_SCALES = (2.0, 4.0)


def guided_name(model: str, g: float) -> str:
    return f"{model}-g{g:g}"


def guided_variants() -> Dict[str, Tuple[str, float]]:
    """name -> (embedded model, g) for every class-conditional embedded model and guidance scale."""
    from ..models.embedded import list_embedded, read_card

    return {guided_name(m, g): (m, g) for m in list_embedded() if read_card(m).get("conditioning")
            for g in GUIDANCE_SCALES}


def guided_model(model: str, g: float) -> QualityModel:
    """The embedded class-conditional model under ClassifierFreeGuidance(w = g - 1), trained for its label
    pool and evaluated on labels cycling through the classes: the demo's ``--guidance g`` model."""
    from ..demo.conditional import demo_model
    from ..models.embedded import load_embedded

    dm = demo_model(load_embedded(model), g)
    card = {**dm.card, "description": f"{dm.card.get('description', model)}; classifier-free guidance g = {g:g}, "
                                      f"evaluation labels cycling 0-{dm.num_classes - 1}"}
    return QualityModel(guided_name(model, g), dm.velocity, dm.shape, card, dm.dtype, preset=model, guidance=g,
                        conditions=dm.conditions, eval_extras=dm.extras)


def oracle_model() -> QualityModel:
    """The Gaussian-mixture oracle: an exact velocity field, 64-D shaped as 1x8x8 images."""
    from ..models.identity import model_tag
    from ..models.oracle import GaussianMixtureFlow

    velocity = GaussianMixtureFlow.random(**ORACLE).float()
    card = {"description": (f"analytic Gaussian-mixture flow (OT path), {ORACLE['components']} components of std "
                            f"{ORACLE['std']} in {ORACLE['dim']}-D"),
            "weights": {"sha256": model_tag(velocity)}}
    return QualityModel("oracle-gmm64", velocity, tuple(ORACLE["shape"]), card, overrides=ORACLE_SETTINGS,
                        embedded=False)


def quality_models(names: Optional[Sequence[str]] = None) -> List[QualityModel]:
    """Every embedded model, the guided variants of the class-conditional ones and the oracle (or the named
    ones), in that order."""
    from ..models.embedded import list_embedded, load_embedded

    guided = guided_variants()
    available = [*list_embedded(), *guided, "oracle-gmm64"]
    wanted = list(names) if names else available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; available: {available}")
    out = []
    for name in wanted:
        if name == "oracle-gmm64":
            out.append(oracle_model())
        elif name in guided:
            out.append(guided_model(*guided[name]))
        else:
            em = load_embedded(name)
            out.append(QualityModel(em.name, em.velocity, em.shape, em.card, em.dtype))
    return out


def weights_id(name: str) -> Optional[str]:
    """The identity of a model's weights as its results entries record it (None: no such model now)."""
    from ..models.embedded import list_embedded, read_card

    if name == "oracle-gmm64":
        return oracle_model().card["weights"]["sha256"]
    name = guided_variants().get(name, (name,))[0]
    return read_card(name)["weights"]["sha256"] if name in list_embedded() else None


@dataclass
class _Provenance:
    """Where each Bespoke solver of a run came from."""

    files: Dict[str, str] = field(default_factory=dict)     # "rk2-nfe10" -> path (relative to the results)
    trained_here: List[str] = field(default_factory=list)
    train_seconds: float = 0.0                               # wall-clock of what was trained in this run


def run_quality(models: Sequence[QualityModel], *, quick: bool, seed: int, results_dir: Path,
                solver_dirs: Sequence[Path] = (), progress: bool = False,
                say: Callable[[str], None] = print) -> dict:
    """The quality section of the results file: one entry per model."""
    note = diffusers_missing()
    if note:
        say(f"quality: {note}")
    section = {"bespoke_nfes": list(QUICK_BESPOKE_NFES if quick else BESPOKE_NFES), "models": {},
               "notes": [note] if note else []}
    for qm in models:
        started = time.perf_counter()
        say(f"quality: {qm.name}")
        section["models"][qm.name] = _one_model(qm, quick=quick, seed=seed, results_dir=results_dir,
                                                solver_dirs=solver_dirs, progress=progress, say=say)
        section["models"][qm.name]["seconds"] = round(time.perf_counter() - started, 1)
    return section


def settings(qm: QualityModel, quick: bool) -> "demo.Preset":
    """The demo's settings for the model (its --quick ones for a quick run), with the model's overrides."""
    cfg = demo.settings(qm.preset or qm.name, quick=quick)
    return dataclasses.replace(cfg, **qm.overrides) if qm.overrides and not quick else cfg


def evaluation_noise(qm: QualityModel, batch: int, seed: int) -> torch.Tensor:
    """The evaluation batch x0 (its own random stream: never the training or validation noise)."""
    g = torch.Generator().manual_seed(stream_seed(seed, "bench-evaluation"))
    return torch.randn(batch, *qm.shape, generator=g, dtype=qm.dtype)


def _one_model(qm: QualityModel, *, quick, seed, results_dir: Path, solver_dirs, progress, say) -> dict:
    cfg = settings(qm, quick)
    nfes = list(QUICK_BESPOKE_NFES if quick else BESPOKE_NFES)
    reference = Reference.for_model(qm, cfg.batch, seed)
    x0 = evaluation_noise(qm, cfg.batch, seed)
    extras = qm.extras(cfg.batch)
    truth = ground_truth(qm.velocity, x0, progress=progress, extras=extras)

    solvers, provenance = _solvers(qm, nfes, cfg, seed, results_dir, solver_dirs, progress, say)
    runs = [solver_run(s) for s in solvers] + [dopri5_run(demo.LOOSE_TOL)]
    runs += demo.baseline_runs(nfes, cfg, baseline_labels(qm.card))
    extra = _extra_runs(qm, sorted(set(cfg.sweep) | set(nfes)))
    rows, _ = compare(qm.velocity, x0, truth, runs + extra, reference=reference, progress=progress, extras=extras)
    # the demo's rows in the demo's order, then the benchmark's own
    rows = rows[:1] + sorted(rows[1:1 + len(runs)], key=demo.row_order) + rows[1 + len(runs):]
    return {
        "description": qm.card.get("description", ""),
        "weights_sha256": qm.card["weights"]["sha256"],
        "embedded": qm.embedded,
        **({"guidance": qm.guidance} if qm.guidance is not None else {}),
        "batch": cfg.batch,
        "distribution_metric": reference.metric,
        "ground_truth": {"method": "dopri5", "tol": truth.tol, "nfe": truth.nfe},
        "training": {"loss": cfg.loss, "iterations": cfg.iterations, "batch_size": cfg.train_batch, "lr": cfg.lr,
                     "gt": "cached", "cache_samples": cfg.cache_samples,
                     "nonstationary": {"loss": cfg.ns_loss, "iterations": cfg.ns_iterations, "base": cfg.ns_base,
                                       "batch_size": cfg.ns_train_batch, "lr": cfg.ns_lr}},
        "solvers": asdict(provenance),
        "rows": [asdict(r) for r in rows],
        "targets": quality_targets(rows) + (guided_targets(rows) if qm.guidance is not None else []),
    }


def _diffusers_draw(method: str, n: int):
    def draw(model, x0, **extras):
        field = (lambda x, t: model(x, t, **extras)) if extras else model
        return diffusers_sample(method, field, x0, n), n

    return draw


def _extra_runs(qm: QualityModel, nfes: Sequence[int]) -> List[Run]:
    """diffusers' solvers at every NFE of the sweep, and dopri5 at the extra tolerances."""
    runs = []
    # diffusers' flow mode assumes the OT path: on a model of another path (VP) it still solves the velocity
    # field's ODE consistently, but it is not that path's dedicated solver, and the label says so (as the demo's).
    path = (qm.card.get("schedule") or {}).get("name", "ot")
    suffix = f", flow mode on a {path.upper()} model" if path != "ot" else ""
    if diffusers_missing() is None:
        for method, (_, label) in SCHEDULERS.items():
            for n in nfes:
                runs.append(Run(method, label + suffix, _diffusers_draw(method, n)))
    return runs + [dopri5_run(tol) for tol in DOPRI5_TOLS]


def _solver_key(method: str, nfe: int) -> str:
    return f"{method.replace('bespoke-', '')}-nfe{nfe}"


def _reusable(path: Path, qm: QualityModel, method: str, cfg):
    """The solver in ``path`` if it is a ``method`` solver trained for this model's weights with the settings'
    loss, iterations, pairs per step, learning rate and start, else None (a quick run's solvers never stand in
    for a full run's, nor a file trained with an earlier preset for the current one: with the cosine decay a
    longer run is a different run, not a better-trained one)."""
    from ..solvers import SolverFileError, load_solver

    if not path.is_file():
        return None
    try:
        solver = load_solver(path)
    except SolverFileError:
        return None
    meta = solver.metadata
    training = meta.get("training") or {}
    if solver.method != method or meta.get("model") != qm.name \
            or meta.get("model_weights_sha256") != qm.card["weights"]["sha256"]:
        return None
    budget = cfg.budget(method)
    options = training.get("options") or {}
    if options.get("loss") != budget["loss"] or training.get("iterations") != budget["iterations"] \
            or training.get("batch_size") != budget["batch_size"]:
        return None
    # a file trained before a preset's learning rate or least-squares start changed is not its result
    # (files from before the start existed have no fit_start: they were trained without it)
    if "lr" in options and not math.isclose(options["lr"], budget["lr"], rel_tol=1e-9):
        return None
    if "fit_start" in budget and bool(options.get("fit_start") or False) != bool(budget["fit_start"]):
        return None
    # (files from before the warp search existed fitted at their own grid only)
    if "fit_warps" in budget and tuple(options.get("fit_warps") or (1.0,)) != tuple(budget["fit_warps"]):
        return None
    return solver


def solver_search_path(qm: QualityModel, results_dir: Path, solver_dirs: Sequence[Path] = ()) -> List[Path]:
    """Folders whose solvers/ subfolder may hold this model's trained solvers, in the order searched:
    this results folder's <model>/, the given folders, the demo's default output ./bespoke-demo."""
    return [Path(results_dir) / qm.name, *map(Path, solver_dirs), Path("bespoke-demo")]


def find_solver(qm: QualityModel, method: str, nfe: int, search: Sequence[Path], cfg):
    """(solver, path) of the first ``method`` solver file (bespoke-rk2, bespoke-rk1, bespoke-ns) in ``search``
    trained for this model with the settings ``cfg`` (settings()), else None."""
    for d in search:
        path = Path(d) / "solvers" / f"{method}-nfe{nfe}.safetensors"
        solver = _reusable(path, qm, method, cfg)
        if solver is not None:
            return solver, path
    return None


def _solvers(qm: QualityModel, nfes, cfg, seed, results_dir: Path, solver_dirs, progress, say):
    """Bespoke order 2 and 1 and the non-stationary solver at each NFE: each reused where a file is found
    (solver_search_path), else trained here (demo.train_solvers, one shared ground-truth cache, saved to
    ``<results>/<model>/solvers`` for the next run)."""
    search = solver_search_path(qm, results_dir, solver_dirs)
    own = search[0]
    found, provenance, missing = {}, _Provenance(), []

    def where(path: Path) -> str:  # relative to the results folder, so committed results hold no local paths
        try:
            return str(path.resolve().relative_to(Path(results_dir).resolve()))
        except ValueError:
            return str(path)

    for n in nfes:
        for method in demo.FAMILIES:
            hit = find_solver(qm, method, n, search, cfg)
            if hit is None:
                missing.append((method, n))
            else:
                found[(method, n)] = hit[0]
                provenance.files[_solver_key(method, n)] = where(hit[1])
    if missing:
        say(f"quality: {qm.name}: training {', '.join(f'{m} NFE {n}' for m, n in missing)} "
            f"(cached ground truth, shared)")
        own.mkdir(parents=True, exist_ok=True)
        wall = 0.0
        with tempfile.TemporaryDirectory(prefix="bespoke-bench-gt-") as cache_dir:
            for n in sorted({n for _, n in missing}):
                families = [m for m in demo.FAMILIES if (m, n) in missing]
                trained, seconds, _ = demo.train_solvers(qm, [n], cfg, seed, cache_dir, own, progress, families)
                wall += seconds
                for s in trained:
                    found[(s.method, s.nfe)] = s
                    key = _solver_key(s.method, s.nfe)
                    provenance.trained_here.append(key)
                    provenance.files[key] = where(own / "solvers" / demo.solver_file_name(s))
        provenance.train_seconds = round(wall, 1)
    return [found[(method, n)] for n in nfes for method in demo.FAMILIES], provenance


def quality_targets(rows: Sequence[Row], nfe: int = 10, reach_nfe: int = 20) -> List[dict]:
    """The issues' quality targets, read off the rows (RMSE against ground truth, lower is better).

    1. Bespoke order 2 at NFE ``nfe`` below every other fixed-NFE solver in the table at that NFE (Bespoke
       order 1 included; the best baseline, Bespoke excluded, is reported beside it).
    2. At ``reach_nfe``: Bespoke order 2's RMSE over the best other fixed-NFE solver's ("within reach":
       met when <= 1.5).
    3. The non-stationary solver's (nonstationary_targets), where the rows have it.
    """
    out = []
    for n, kind in ((nfe, "ahead"), (reach_nfe, "reach")):
        mine = next((r for r in rows if r.method == "bespoke-rk2" and r.nfe == n), None)
        others = [r for r in rows if r.method in FIXED_METHODS and r.nfe == n]
        baselines = [r for r in others if not r.method.startswith("bespoke")]
        if mine is None or not baselines:
            continue
        best, base = min(others, key=lambda r: r.rmse), min(baselines, key=lambda r: r.rmse)
        ratio = mine.rmse / best.rmse if best.rmse > 0 else math.inf
        target = (f"Bespoke order 2 at NFE {n} ahead of every other fixed-NFE solver at NFE {n}" if kind == "ahead" else
                  f"Bespoke order 2 at NFE {n} within reach (<= 1.5x RMSE) of the best other fixed-NFE solver")
        out.append({"target": target, "bespoke_rmse": mine.rmse, "best_other": best.label,
                    "best_other_rmse": best.rmse, "ratio": ratio, "best_baseline": base.label,
                    "best_baseline_rmse": base.rmse, "met": ratio < 1.0 if kind == "ahead" else ratio <= 1.5})
    return out + nonstationary_targets(rows, nfe, reach_nfe)


def guided_targets(rows: Sequence[Row], nfe: int = 10, gain_db: float = 3.0) -> List[dict]:
    """Issue 11's targets on a guided model: Bespoke order 2 at NFE ``nfe`` at least ``gain_db`` dB of mean PSNR
    over midpoint and over DPM-Solver++(2M) at the same NFE (the rows' PSNR is the mean over the batch)."""
    mine = next((r for r in rows if r.method == "bespoke-rk2" and r.nfe == nfe), None)
    out = []
    for method in ("midpoint", "dpm++2m"):
        other = next((r for r in rows if r.method == method and r.nfe == nfe), None)
        if mine is None or other is None:
            continue
        gain = mine.psnr - other.psnr
        out.append({"target": f"Bespoke order 2 at NFE {nfe} at least +{gain_db:g} dB PSNR over {other.label} at NFE {nfe}",
                    "measured": f"Bespoke o2 {mine.psnr:.2f} dB; {other.label} {other.psnr:.2f} dB ({gain:+.2f} dB)",
                    "bespoke_psnr": mine.psnr, "other_psnr": other.psnr, "gain_db": gain, "met": gain >= gain_db})
    return out


def nonstationary_targets(rows: Sequence[Row], nfe: int = 10, reach_nfe: int = 20) -> List[dict]:
    """The non-stationary solver's targets (RMSE ratios, lower is better): at NFE ``nfe`` at or below
    midpoint's RMSE at ``reach_nfe``, and at most 0.8x Bespoke order 2's at ``nfe`` (same training budget)."""
    def find(method: str, n: int) -> Optional[Row]:
        return next((r for r in rows if r.method == method and r.nfe == n), None)

    mine, out = find("bespoke-ns", nfe), []
    for method, n, bound in (("midpoint", reach_nfe, 1.0), ("bespoke-rk2", nfe, 0.8)):
        other = find(method, n)
        if mine is None or other is None or other.rmse <= 0:
            continue
        ratio = mine.rmse / other.rmse
        what = f"midpoint's at NFE {n}" if method == "midpoint" else f"{bound:g}x Bespoke order 2's at NFE {n}"
        out.append({"target": f"Non-stationary at NFE {nfe}: RMSE at most {what}", "solver": "NS",
                    "bespoke_rmse": mine.rmse, "best_other": other.label, "best_other_rmse": other.rmse,
                    "ratio": ratio, "met": ratio <= bound})
    return out
