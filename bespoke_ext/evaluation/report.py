"""The demo's results table: rows, the markdown/JSON writers, and reading NFEs off an error curve."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

__all__ = ["Row", "markdown_table", "write_results", "nfe_to_match"]


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


def _json_safe(value):
    """inf/nan are not JSON: written as the strings "inf" / "nan" instead of invalid tokens."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_results(out_dir, rows: Sequence[Row], summary: dict, table_text: str) -> Tuple[Path, Path]:
    """Write ``results.md`` (the table and the summary lines) and ``results.json`` (rows + summary)."""
    out = Path(out_dir)
    md = out / "results.md"
    md.write_text(table_text + "\n")
    js = out / "results.json"
    js.write_text(json.dumps(_json_safe({"rows": [asdict(r) for r in rows], "summary": summary}), indent=2) + "\n")
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
