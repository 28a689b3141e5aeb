"""Comparing solvers on one batch against ground truth: the public API the demo and the bench stand on.

    truth = ground_truth(model, x0)                       dopri5 at rtol = atol = GT_TOL (method.md §1)
    runs = [baseline_run("midpoint", 10), solver_run(solver), dopri5_run(1e-3)]
    rows, samples = compare(model, x0, truth, runs, reference=Reference.for_model(em, len(x0), seed=0))
    nfe, how = nfe_to_match([(r.nfe, r.rmse) for r in rows if r.method == "midpoint"], target_rmse)

Every run starts from the same noise x0; a row holds RMSE and PSNR against the ground truth
(metrics/errors.py), the distribution metric against real data where the model has one (FCD for the
digit models, sliced Wasserstein for 2-D ones), and the wall-clock of the call.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import metrics
from .models import data as data_mod
from .sampling import sample

__all__ = [
    "Row", "Run", "GroundTruth", "Reference", "compare", "ground_truth", "baseline_run", "solver_run", "dopri5_run",
    "solver_label", "BASELINES", "baseline_labels", "GT_TOL", "stream_seed", "torch_threads", "markdown_table",
    "write_results",
    "json_safe", "nfe_to_match",
]

GT_TOL = 1e-5  # method.md §1: ground truth at rtol = atol = 1e-5 or tighter

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


@contextmanager
def torch_threads(threads: Optional[int] = None):
    """torch CPU threads for a comparison run, restored after. Default half the cores: the models are
    small, and where other processes share the cores, oversubscribed threads spin at every parallel
    region; measured on 2 busy cores, the MNIST model ran 4x slower per sample at 2 threads than at 1
    (the 2-D model 25x)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"--threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def stream_seed(seed: int, stream: str) -> int:
    """The seed of a named random stream (evaluation noise, reference data), independent of training's
    streams, which are named differently."""
    from .training.batches import derive_seed

    return derive_seed(seed, stream)


@dataclass
class Row:
    """One solver run on the evaluation batch.

    method: machine name ("euler", "midpoint", "heun", "rk4", "dpm++2m", "dopri5", "ground truth",
        "bespoke-rk1", "bespoke-rk2"); label: the name printed in the table.
    nfe: model evaluations per sample (measured for the adaptive solver).
    rmse, psnr: against ground truth from the same noise (method.md §1).
    distribution: name -> value of the distribution-level metric (FCD or SWD) against real data.
    seconds: wall-clock of the sampling call for the whole batch.
    """

    method: str
    label: str
    nfe: int
    rmse: float
    psnr: float
    seconds: float
    distribution: Optional[Dict[str, float]] = None


@dataclass(frozen=True)
class Run:
    """One solver to compare. ``draw(model, x0, **extras)`` returns (samples, model evaluations per
    sample); extras are the model's per-call inputs (per-sample class labels, for instance)."""

    method: str
    label: str
    draw: Callable[..., Tuple[Tensor, int]]


def baseline_run(method: str, nfe: int, label: Optional[str] = None) -> Run:
    """A fixed-NFE method of ``bx.sample`` (euler, midpoint, heun, rk4, dpm++2m)."""
    return Run(method, label or BASELINES.get(method, (method, 1))[0],
               lambda model, x0, **extras: (sample(model, x0, method=method, nfe=nfe, **extras), nfe))


def solver_label(solver) -> str:
    """How tables and figures name a trained solver: "Bespoke order 2", "Bespoke non-stationary"."""
    return "Bespoke non-stationary" if solver.method == "bespoke-ns" else f"Bespoke order {solver.order}"


def solver_run(solver, label: Optional[str] = None) -> Run:
    """A trained solver (``solver.method`` names its rows: bespoke-rk2, bespoke-rk1, bespoke-ns)."""
    return Run(solver.method, label or solver_label(solver),
               lambda model, x0, **extras: (sample(model, x0, solver=solver, **extras), solver.nfe))


def dopri5_run(tol: float) -> Run:
    """dopri5 at rtol = atol = tol: what an adaptive solver costs at an error comparable to the others."""
    def draw(model, x0, **extras):
        x, stats = sample(model, x0, method="dopri5", atol=tol, rtol=tol, return_stats=True, **extras)
        return x, stats.nfe

    return Run("dopri5", f"dopri5 (tol {tol:g})", draw)


@dataclass
class GroundTruth:
    """x(1) from x0 by dopri5 at rtol = atol = ``tol``; ``nfe`` it spent, wall-clock ``seconds``."""

    x: Tensor
    nfe: int
    seconds: float
    tol: float

    def row(self, reference: Optional["Reference"] = None) -> Row:
        return Row(method="ground truth", label=f"ground truth (dopri5, tol {self.tol:g})", nfe=self.nfe, rmse=0.0,
                   psnr=math.inf, seconds=self.seconds,
                   distribution=reference.distance(self.x) if reference is not None else None)


def ground_truth(model: Callable, x0: Tensor, *, tol: float = GT_TOL, progress: bool = False,
                 extras: Optional[dict] = None) -> GroundTruth:
    """The reference every run is measured against (method.md §1): dopri5 at rtol = atol = ``tol`` with
    training's error norm, the largest per-sample RMS in the batch (groundtruth/odesolve.py), so every
    sample, the hardest included, is solved to ``tol``; torchdiffeq's default batch-RMS norm would
    leave hard samples far looser than asked. The whole batch is one adaptive solve."""
    from .groundtruth import solve_trajectories

    stats: Dict[str, int] = {}
    with tqdm(total=x0.shape[0], desc=f"ground truth (dopri5, tol {tol:g}, per-sample norm)", unit=" samples",
              disable=not progress) as bar:
        start = time.perf_counter()
        truth = solve_trajectories(model, x0, torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=tol, atol=tol,
                                   model_extras=extras, group_size=x0.shape[0], progress=bar, stats=stats)[-1]
        seconds = time.perf_counter() - start
    return GroundTruth(truth, stats["nfe"], seconds, tol)


@dataclass
class Reference:
    """Real data and the distribution-level metric for a model: FCD in a digit classifier's feature
    space (image models with a classifier) or sliced Wasserstein (2-D models); none otherwise.

    ``floor``: the metric between ``batch`` further real samples and the reference. Both metrics
    are biased upward at small sample counts (the FCD strongly: 64-d covariances from a few dozen
    samples), so the floor shows what "as good as real data" reads at a given batch size.
    """

    metric: Optional[str]
    data: Optional[Tensor] = None
    classifier: Optional[torch.nn.Module] = None
    features: Optional[Tensor] = None
    floor: Optional[float] = None

    @classmethod
    def for_model(cls, model, batch: int, seed: int) -> "Reference":
        """For an embedded model (or any object with ``.card`` and ``.shape``) at evaluation batch ``batch``."""
        data_name = model.card.get("data", {}).get("name")
        if len(model.shape) == 1 and model.shape[0] == 2 and data_name in data_mod.DATASETS:
            # fresh points from the data distribution, on seeds of their own (pretraining drew its
            # data from seeds 0 and 1)
            pts = data_mod.load_dataset(data_name, n=max(4 * batch, 2048),
                                        seed=stream_seed(seed, "demo-reference") % 2 ** 31)
            ref = cls(metric="SWD", data=pts)
            more = data_mod.load_dataset(data_name, n=batch, seed=stream_seed(seed, "demo-floor") % 2 ** 31)
        else:
            clf_name = metrics.classifier_for_data(data_name) if data_name else None
            if clf_name is None:
                return cls(metric=None)
            clf = metrics.load_classifier(clf_name)
            heldout = data_mod.load_dataset(data_name, split="test")  # seen by neither the model nor the classifier
            with torch.no_grad():
                feats = clf.features(heldout)
            ref = cls(metric="FCD", data=heldout, classifier=clf, features=feats)
            train = data_mod.load_dataset(data_name, split="train")
            g = torch.Generator().manual_seed(stream_seed(seed, "demo-floor"))
            more = train[torch.randperm(len(train), generator=g)[:batch]]  # the split is sorted by class
        ref.floor = ref.distance(more)[ref.metric]
        return ref

    def distance(self, samples: Tensor) -> Optional[Dict[str, float]]:
        if self.metric == "SWD":
            return {"SWD": metrics.sliced_wasserstein(samples.reshape(samples.shape[0], -1), self.data)}
        if self.metric == "FCD":
            with torch.no_grad():
                feats = self.classifier.features(samples.float().clamp(-1, 1))
            return {"FCD": metrics.frechet_distance(feats, self.features)}
        return None


def compare(model: Callable, x0: Tensor, truth: GroundTruth, runs: Sequence[Run], *,
            reference: Optional[Reference] = None, progress: bool = False, extras: Optional[dict] = None,
            desc: str = "evaluating solvers") -> Tuple[List[Row], Dict[Tuple[str, int], Tensor]]:
    """Every run from x0 (with the model's ``extras``, as the ground truth was solved), measured against
    ``truth``: (rows, samples keyed by (method, nfe)).

    The ground truth's own row comes first; the others follow in the order of ``runs``.
    """
    rows = [truth.row(reference)]
    samples: Dict[Tuple[str, int], Tensor] = {("ground truth", truth.nfe): truth.x}
    for run in tqdm(runs, desc=desc, unit=" run", disable=not progress):
        start = time.perf_counter()
        x, nfe = run.draw(model, x0, **(extras or {}))
        seconds = time.perf_counter() - start
        rows.append(Row(method=run.method, label=run.label, nfe=int(nfe), rmse=metrics.rmse(x, truth.x),
                        psnr=metrics.psnr(x, truth.x), seconds=seconds,
                        distribution=reference.distance(x) if reference is not None else None))
        samples[(run.method, int(nfe))] = x
    return rows, samples


def _fmt(value: Optional[float], spec: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return format(value, spec)


def markdown_table(rows: Sequence[Row], distribution_name: Optional[str] = None) -> str:
    """A GitHub-markdown table, one line per row, in the given order."""
    head = ["method", "NFE", "RMSE", "PSNR (dB)"]
    if distribution_name:
        head.append(distribution_name)
    head.append("wall-clock / batch (s)")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r.label, str(r.nfe), _fmt(r.rmse, ".4f"), _fmt(r.psnr, ".2f")]
        if distribution_name:
            cells.append(_fmt((r.distribution or {}).get(distribution_name), ".3f"))
        cells.append(_fmt(r.seconds, ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_safe(value):
    """inf/nan are not JSON: written as the strings "inf" / "nan" instead of invalid tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_results(out_dir, rows: Sequence[Row], summary: dict, table_text: str) -> Tuple[Path, Path]:
    """Write ``results.md`` (the table and the summary lines) and ``results.json`` (rows + summary)."""
    out = Path(out_dir)
    md = out / "results.md"
    md.write_text(table_text + "\n")
    js = out / "results.json"
    js.write_text(json.dumps(json_safe({"rows": [asdict(r) for r in rows], "summary": summary}), indent=2) + "\n")
    return md, js


def nfe_to_match(curve: Sequence[Tuple[int, float]], target: float) -> Tuple[Optional[float], str]:
    """The NFE at which a decreasing error curve [(nfe, error), ...] reaches ``target``.

    Errors of fixed-order solvers fall like a power of the NFE, so the curve is interpolated linearly
    in log(error) versus log(NFE) between the two measured points that bracket the target. Returns
    (nfe, how): how is "interpolated", "measured" (a point equals the target), "already at the
    smallest NFE measured" or "extrapolated beyond the largest NFE measured" (from the last two
    points; None if they do not decrease).
    """
    pts = sorted((int(n), float(e)) for n, e in curve if e > 0 and math.isfinite(e))
    if len(pts) < 2:
        raise ValueError(f"curve must hold at least two points with positive finite errors, got {list(curve)}")
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target must be a positive finite error, got {target!r}")
    if pts[0][1] <= target:
        return float(pts[0][0]), "already at the smallest NFE measured"
    for (n0, e0), (n1, e1) in zip(pts[:-1], pts[1:]):
        if e1 == target:
            return float(n1), "measured"
        if e0 > target > e1:
            return _loglog(n0, e0, n1, e1, target), "interpolated"
    (n0, e0), (n1, e1) = pts[-2], pts[-1]
    if e1 >= e0:
        return None, "not reached: the error stops decreasing at the largest NFE measured"
    return _loglog(n0, e0, n1, e1, target), "extrapolated beyond the largest NFE measured"


def _loglog(n0: int, e0: float, n1: int, e1: float, target: float) -> float:
    """log n linear in log e through (n0, e0) and (n1, e1), evaluated at e = target."""
    w = (math.log(target) - math.log(e0)) / (math.log(e1) - math.log(e0))
    return math.exp(math.log(n0) + w * (math.log(n1) - math.log(n0)))
