"""The performance targets the report checks: every target, measured or not, with its status."""

from __future__ import annotations

import statistics
from typing import List, Sequence, Tuple

from .report_format import fmt_g, fmt_s, fmt_x, met_status, shape_label
from .results import Results

__all__ = ["targets", "training_targets", "gpu_bandwidth", "kernel_targets", "GPU_RUN"]

GPU_RUN = "benchmarks/gpu/run.sh"  # the script whose results fill in the GPU targets


def targets(res: Results) -> List[Tuple[str, str, str]]:
    """(target, measured, status) for every target the issue names, measured or not."""
    out = []
    for name, m in res.bench.items():
        w = m.get("wallclock")
        if w:
            for t in w.get("targets", []):
                out.append((f"{t['target']} [{name}]", fmt_x(t["value"]), met_status(t["met"])))
        q = m.get("quality")
        if q:
            for model, entry in q.get("models", {}).items():
                for t in entry.get("targets", []):
                    if "measured" in t:  # a target that states its own reading (PSNR gains)
                        out.append((f"{t['target']} [{model}]", t["measured"], met_status(t["met"])))
                        continue
                    measured = (f"{t.get('solver', 'Bespoke o2')} RMSE {fmt_g(t['bespoke_rmse'])}; "
                                f"{'best other' if 'best_baseline' in t else 'against'}: {t['best_other']} "
                                f"{fmt_g(t['best_other_rmse'])} (ratio {fmt_x(t['ratio'])})")
                    if t.get("best_baseline") and t["best_baseline"] != t["best_other"]:
                        measured += (f"; best baseline: {t['best_baseline']} {fmt_g(t['best_baseline_rmse'])} "
                                     f"(ratio {fmt_x(t['bespoke_rmse'] / t['best_baseline_rmse'])})")
                    status = met_status(t["met"]) if entry.get("embedded", True) else \
                        f"{'ahead' if t['met'] else 'behind'} (for information: the target names the embedded models)"
                    out.append((f"{t['target']} [{model}]", measured, status))
        out += training_targets(m.get("training") or {}, name)
    gpu = [(path, t) for path, data in res.gpu_sampling for t in data.get("targets", [])]
    for path, t in gpu:
        out.append((f"{t['target']} [{path.parent.name}]", fmt_x(t["value"]), met_status(t["met"])))
    if not gpu:
        out.append(("GPU: with CUDA-graph capture >= 3x faster than torchdiffeq fixed-grid, small model, NFE 10",
                    "not measured", f"missing until a session with a GPU runs `{GPU_RUN}`"))
    bandwidth = gpu_bandwidth(res)
    if bandwidth:
        for label, value in bandwidth:
            out.append((f"GPU: fused update >= 80% of device copy bandwidth [{label}]", f"{100 * value:.0f}%",
                        met_status(value >= 0.8)))
    else:
        out.append(("GPU: fused update >= 80% of device copy bandwidth", "not measured",
                    f"missing until a session with a GPU runs `{GPU_RUN}`"))
    return out


def gpu_bandwidth(res: Results) -> List[Tuple[str, float]]:
    """Share of copy bandwidth of the fused, preallocated update at the largest size of each GPU run."""
    out = []
    for path, data in res.gpu_ops:
        rows = [r for r in (data or {}).get("rows", []) if r.get("op") == "rk_update" and "out_of_copy_bw" in r]
        if rows:
            top = max(r["size"] for r in rows)
            for r in rows:
                if r["size"] == top:
                    out.append((f"{path.parent.name} {r['dtype']} n={top:.1e}", r["out_of_copy_bw"]))
    return out


def kernel_targets(summary: Sequence[dict]) -> List[str]:
    """Issue 10's CPU kernel targets over the rows of report_ops.summarise, as met / MISSED with the worst case
    (the last part of each ops_<machine>.md table)."""
    up = [r for r in summary if r["op"] == "rk_update"]
    lines = []

    def check(label, cases, field, bound):
        cases = [r for r in cases if r.get(field) is not None]
        if not cases:
            return
        worst = min(cases, key=lambda r: r[field])
        ok = worst[field] >= bound
        name = f"{shape_label(worst['shape'])} k={worst['k']} {worst['dtype']} {worst['coeffs']}"
        lines.append(f"- {label}: {'met' if ok else 'MISSED'}; worst {worst[field]} at {name}, "
                     f"{worst['threads']} thread(s) (median over cases {round(statistics.median(r[field] for r in cases), 2)})")

    check("fused_out >= 1.0x the eager in-place chain at every shape", up, "inplace_over_out", 1.0)
    check("fused_out >= 1.3x the in-place chain at >= 1M elements", [r for r in up if r["size"] >= 1 << 20],
          "inplace_over_out", 1.3)
    check("fused_out >= 0.7 of copy bandwidth at >= 4M elements", [r for r in up if r["size"] >= 4 << 20],
          "out_of_copy_bw", 0.7)
    check("fused_out not slower than torch.compile", up, "compiled_over_out", 1.0)
    check("allocating call >= 2.5x eager on flat 16M",
          [r for r in up if len(r["shape"]) == 1 and r["size"] >= 16_000_000], "eager_over_fused", 2.5)
    check("backward >= 2x eager autograd", [r for r in summary if r["op"] == "rk_update_backward"],
          "eager_over_fused", 2.0)
    return lines


def training_targets(t: dict, machine: str) -> List[Tuple[str, str, str]]:
    """Issues 11 and 14: training, ground truth included, at most 3% of pretraining, read against the
    pretraining loop timed in the same run (the card's own wall-clock was measured under another day's load)."""
    out, limit = [], t.get("target")
    for model, e in t.get("models", {}).items():
        for key, r in e.get("runs", {}).items():
            share = r.get("fraction_of_pretraining_now")
            if limit is None or share is None or r.get("gt") == "online":
                continue
            out.append((f"training cost <= {100 * limit:.0f}% of pretraining, {r.get('family', key)} NFE {t.get('nfe')} "
                        f"[{model}, {machine}]",
                        f"{fmt_s(r['wall_seconds'])} s of {fmt_s(e['pretraining_now']['seconds'])} s pretraining now "
                        f"({100 * share:.1f}%; card: {100 * r['fraction_of_pretraining']:.1f}%)",
                        met_status(share <= limit)))
    return out
