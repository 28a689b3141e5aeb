"""The report's plots: RMSE versus NFE per model, and each wall-clock contender's time over the floor."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

from .report_format import as_number
from .results import FIXED_ORDER, Results, method_labels

__all__ = ["quality_plot", "wallclock_plot", "write_plots"]


def quality_plot(entry: dict, path: Path, title: str) -> None:
    from ..figures import save_error_curves

    labels = method_labels(entry)
    curves: Dict[str, List[Tuple[int, float]]] = {}
    points: Dict[str, Tuple[int, float]] = {}
    for r in entry.get("rows", []):
        rmse = as_number(r["rmse"])
        if rmse is None or rmse <= 0:
            continue
        if r["method"].startswith("bespoke"):
            points[f"{r['label']}, NFE {r['nfe']}"] = (r["nfe"], rmse)
        elif r["method"] == "dopri5":
            curves.setdefault("dopri5 (adaptive)", []).append((r["nfe"], rmse))
        elif r["method"] in FIXED_ORDER:
            curves.setdefault(labels[r["method"]], []).append((r["nfe"], rmse))
    save_error_curves(curves, points, path, title=title)


def wallclock_plot(w: dict, path: Path, title: str) -> None:
    """Per workload, each contender's time over the floor (per-round ratio, median), the 1.10 target dotted."""
    from ..figures import pyplot

    plt = pyplot()
    workloads = list(w.get("workloads", {}).items())
    cols = min(3, len(workloads))
    rows = -(-len(workloads) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 + 3.6 * cols, 0.6 + 3.0 * rows), squeeze=False, sharey=True)
    labels = w.get("labels", {})
    for ax in axes.flat[len(workloads):]:
        ax.axis("off")
    for i, (ax, (key, wl)) in enumerate(zip(axes.flat, workloads)):
        stats = [(c, s) for c, s in wl["stats"].items() if c != "floor"]
        y = list(range(len(stats)))
        ax.barh(y, [s["x_floor"] for _, s in stats],
                color=["tab:orange" if c.startswith("bespoke") else "tab:gray" for c, _ in stats])
        ax.axvline(1.0, color="black", lw=1)
        ax.axvline(1.1, color="black", ls=":", lw=1)
        if i % cols == 0:
            ax.set_yticks(y, [labels.get(c, c) for c, _ in stats], fontsize=7)
        ax.set_xlabel("time / model-evaluation floor", fontsize=8)
        ax.set_title(f"{key} (batch {wl['batch']})", fontsize=8)
    axes[0, 0].invert_yaxis()
    fig.suptitle(f"{title} (median of per-round ratios; dotted: 1.10)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(res: Results, draw: bool = True) -> Tuple[Dict[str, Dict[str, str]], List[Path]]:
    """Every plot of ``res`` into its folder: (machine -> {model or "wallclock": PNG file name}, their paths).
    With ``draw=False`` only the names and paths, nothing drawn (to render REPORT.md's text alone)."""
    folder = res.folder
    written: List[Path] = []
    plots: Dict[str, Dict[str, str]] = {}
    for name, m in res.bench.items():
        plots[name] = {}
        for model, entry in m.get("quality", {}).get("models", {}).items():
            path = folder / f"{name}_quality_{model}.png"
            if draw:
                quality_plot(entry, path, f"{model}: RMSE against ground truth versus NFE")
            plots[name][model] = path.name
            written.append(path)
        if m.get("wallclock", {}).get("workloads"):
            path = folder / f"{name}_wallclock.png"
            if draw:
                wallclock_plot(m["wallclock"], path, f"sampling time over the model-evaluation floor ({name})")
            plots[name]["wallclock"] = path.name
            written.append(path)
    return plots, written
