"""PNG figures of the demo and the benchmark report (matplotlib, Agg backend: no display needed).

    save_sample_grid      the same noise through each method: image rows, or 2-D scatter panels
    save_error_curves     RMSE against ground truth versus NFE, a line per baseline method, a marker
                          per Bespoke solver
    save_schedules        Bespoke solvers' learned time t(r) (and t(r) - r) and scale s(r), r in [0, 1]
    save_nonstationary    non-stationary solvers' learned times t_i against their base's, and one
                          solver's coefficients a_i, b_ij (and what training changed in them)
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["save_sample_grid", "save_error_curves", "save_schedules", "save_nonstationary", "pyplot"]

_DPI = 110


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works without a display, never opens a window
    import matplotlib.pyplot as plt

    return plt


def save_sample_grid(panels: Sequence[Tuple[str, Tensor]], path, *, columns: int = 10, title: str = "") -> None:
    """One row per (label, samples): images [B, 1, H, W] in [-1, 1] show their first ``columns``
    samples; 2-D points [B, 2] are drawn as one scatter panel per label (every point)."""
    if not panels:
        raise ValueError("panels must hold at least one (label, samples) pair")
    shapes = {tuple(x.shape[1:]) for _, x in panels}
    if len(shapes) != 1:
        raise ValueError(f"panels must share one per-sample shape, got {sorted(shapes)}")
    shape = shapes.pop()
    plt = pyplot()
    if len(shape) == 1 and shape[0] == 2:
        fig = _scatter_panels(plt, panels)
    elif len(shape) == 3 and shape[0] == 1:
        fig = _image_rows(plt, panels, columns)
    else:
        raise ValueError(f"samples must be images [B, 1, H, W] or points [B, 2], got per-sample shape {shape}")
    if title:
        fig.suptitle(title, fontsize=10)
        if len(shape) == 1:
            fig.tight_layout(rect=(0, 0, 1, 0.95))  # room for the title above the panels' own
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _image_rows(plt, panels, columns: int):
    columns = min(columns, min(x.shape[0] for _, x in panels))
    cell = 0.75
    fig, axes = plt.subplots(len(panels), columns, squeeze=False,
                             figsize=(1.9 + columns * cell, 0.35 + len(panels) * cell))
    for row, (label, x) in enumerate(panels):
        images = x[:columns, 0].detach().float().cpu().clamp(-1, 1)
        for col in range(columns):
            ax = axes[row, col]
            ax.imshow(images[col].numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=1.8 / (1.9 + columns * cell), right=0.99, top=0.93, bottom=0.01, wspace=0.04, hspace=0.06)
    return fig


def _scatter_panels(plt, panels):
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, figsize=(3 * cols, 3 * rows + 0.3))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (label, x) in zip(axes.flat, panels):
        p = x.detach().float().cpu()
        ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=3, alpha=0.6, lw=0)
        ax.set_title(label, fontsize=8)
        ax.set_xlim(-1.8, 1.8)
        ax.set_ylim(-1.8, 1.8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def save_error_curves(curves: Dict[str, Sequence[Tuple[int, float]]], points: Dict[str, Tuple[int, float]], path, *,
                      match: Optional[Tuple[str, float, float]] = None, ylabel: str = "RMSE vs ground truth",
                      title: str = "") -> None:
    """Log-scale error versus NFE.

    curves: method -> [(nfe, error), ...], drawn as lines with markers (baselines).
    points: label -> (nfe, error), drawn as large markers (Bespoke solvers).
    match: optional (label, nfe, error): where a baseline's curve reaches a Bespoke solver's error,
        marked with a dotted line and a text label.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8.6, 4.6))
    for method, pts in curves.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, lw=1.4, label=method)
    markers = iter("*D^vsP")
    for label, (nfe, err) in points.items():
        second = "order 2" in label  # the headline solvers: larger and black, drawn on top
        ax.plot([nfe], [err], next(markers, "o"), ms=13 if second else 9, color="black" if second else "tab:gray",
                mec="white", label=label, zorder=6 if second else 5)
    if match is not None:
        label, nfe, err = match
        ax.axhline(err, color="black", ls=":", lw=1)
        ax.axvline(nfe, color="black", ls=":", lw=1)
        ax.annotate(label, (nfe, err), xytext=(-6, 6), textcoords="offset points", ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("NFE (model evaluations per sample)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    ax.set_title(title or "error against ground truth versus NFE", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def save_schedules(solvers: Dict[str, "torch.nn.Module"], path, *, title: str = "") -> None:
    """t(r), t(r) - r and s(r) of Bespoke solvers: values at the grid points r_i = i / n (and, for
    order 2, the half points r_i + h / 2), against the identity t = r, s = 1 (plain Euler /
    midpoint). The learned times often stay within a few hundredths of r, which only the middle
    panel shows."""
    if not solvers:
        raise ValueError("solvers must hold at least one (label -> BespokeSolver)")
    plt = pyplot()
    fig, (ax_t, ax_d, ax_s) = plt.subplots(1, 3, figsize=(13.5, 4))
    for label, solver in solvers.items():
        r, t, s = _schedule_points(solver)
        line = ax_t.plot(r, t, "o-", ms=3, lw=1.3, label=label)[0]
        ax_d.plot(r, [ti - ri for ti, ri in zip(t, r)], "o-", ms=3, lw=1.3, color=line.get_color(), label=label)
        ax_s.plot(r, s, "o-", ms=3, lw=1.3, color=line.get_color(), label=label)
    ax_t.plot([0, 1], [0, 1], "k--", lw=0.8, label="identity (t = r)")
    ax_d.axhline(0.0, color="black", ls="--", lw=0.8, label="identity")
    ax_s.axhline(1.0, color="black", ls="--", lw=0.8, label="identity (s = 1)")
    ax_t.set(xlabel="r (solver time)", ylabel="t(r) (model time)", title="learned time t(r)")
    ax_d.set(xlabel="r (solver time)", ylabel="t(r) - r", title="time shift t(r) - r")
    ax_s.set(xlabel="r (solver time)", ylabel="s(r)", title="learned scale s(r)")
    for ax in (ax_t, ax_d, ax_s):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)


def _schedule_points(solver):
    """(r, t, s) lists in r order: grid points, with the half points interleaved for order 2."""
    with torch.no_grad():
        g = solver.grid()
    n = solver.steps
    r = [i / n for i in range(n + 1)]
    t, s = g.t.tolist(), g.s.tolist()
    if g.tm is None:
        return r, t, s
    rm = [(i + 0.5) / n for i in range(n)]
    merged = sorted(zip(r + rm, t + g.tm.tolist(), s + g.sm.tolist()))
    return [m[0] for m in merged], [m[1] for m in merged], [m[2] for m in merged]



def save_nonstationary(solvers: Dict[str, "torch.nn.Module"], path, *, title: str = "") -> None:
    """Non-stationary solvers (method.md §9): left, each solver's time grid t_i - i/n against its base's
    (dashed); middle, the last solver's coefficient matrix [a_i | b_i0 .. b_ii] (row i makes x_{i+1} from
    x_0 and the velocities U_0..U_i); right, that matrix minus its base's: what training changed."""
    if not solvers:
        raise ValueError("solvers must hold at least one (label -> NonStationarySolver)")
    plt = pyplot()
    fig, (ax_t, ax_c, ax_d) = plt.subplots(1, 3, figsize=(14, 4.2), gridspec_kw={"width_ratios": [1.2, 1, 1]})
    for label, solver in solvers.items():
        with torch.no_grad():
            t, base = solver.times(), solver.base_times.double()
        r = torch.arange(t.numel(), dtype=torch.float64) / (t.numel() - 1)
        line = ax_t.plot(r, t - r, "o-", ms=3, lw=1.3, label=label)[0]
        ax_t.plot(r, base - r, "--", lw=0.9, color=line.get_color(), label=f"{label}: base {solver.base}")
    ax_t.axhline(0.0, color="black", lw=0.6)
    ax_t.set(xlabel="i / n", ylabel="t_i - i / n", title="learned times (dashed: the base's)")
    ax_t.grid(True, alpha=0.3)
    ax_t.legend(fontsize=7)
    label, solver = list(solvers.items())[-1]
    with torch.no_grad():
        a, b = solver.coefficients()
    n = a.numel()
    rows, cols = torch.tril_indices(n, n)
    a0 = solver.base_a.double()   # the base's tables: what a fresh solver holds
    b0 = b.new_zeros(n, n).index_put((rows, cols), solver.base_b.double())
    mask = torch.cat([torch.ones(n, 1, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)
    for ax, m, name in ((ax_c, torch.cat([a[:, None], b], 1), f"{label}: [a_i | b_ij]"),
                        (ax_d, torch.cat([(a - a0)[:, None], b - b0], 1), "change from the base")):
        m = m.masked_fill(~mask, float("nan"))
        lim = float(m[mask].abs().max()) or 1.0
        im = ax.imshow(m.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(n + 1), ["x0"] + [f"U{j}" for j in range(n)], fontsize=6, rotation=90)
        ax.set_yticks(range(n), [f"x{i + 1}" for i in range(n)], fontsize=6)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
