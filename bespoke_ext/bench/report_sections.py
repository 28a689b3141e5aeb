"""REPORT.md's sections, one function each: quality versus NFE, wall-clock, training cost, the overhead
and training tables of benchmarks/bench_sampling.py and benchmarks/bench_training.py, and the GPU figures."""

from __future__ import annotations

from typing import Dict, List, Optional

from .report_format import as_number, fmt_g, fmt_ms, fmt_s, fmt_x, md_table, quick_mark
from .report_targets import GPU_RUN
from .results import FIXED_ORDER, Results, method_labels, rows_by_method_nfe

__all__ = ["quality_section", "wallclock_markdown", "training_section", "sampling_cpu_section",
           "bench_training_section", "gpu_section"]


def quality_section(name: str, q: dict, plots: Dict[str, str]) -> List[str]:
    lines = [f"## Quality versus NFE [{name}]{quick_mark(q)}", "",
             "RMSE of x(1) against the ground truth from the same noise (dopri5, rtol = atol = 1e-5), per-sample RMS "
             "averaged over the batch (method.md §1); lower is better. The best fixed-NFE entry of each column is in "
             "bold. NFE = model evaluations per sample. diffusers' schedulers run in flow-prediction mode on the same "
             "velocity field (bespoke_ext/bench/diffusers.py states the time and sign mapping).", ""]
    lines += [f"- {n}" for n in q.get("notes", [])]
    for model, entry in q.get("models", {}).items():
        rows = rows_by_method_nfe(entry)
        labels = method_labels(entry)
        methods = [m for m in FIXED_ORDER if any(k[0] == m for k in rows)]
        nfes = sorted({n for (m, n) in rows if m in methods})
        lines += ["", f"### {model}", "",
                  f"{entry.get('description', '')}. Evaluation batch {entry.get('batch')}; ground truth NFE "
                  f"{entry.get('ground_truth', {}).get('nfe')}; measured {entry.get('measured_at', '?')} in "
                  f"{entry.get('seconds')} s.", ""]
        solvers = entry.get("solvers", {})
        trained = solvers.get("trained_here", [])
        reused = sorted(set(solvers.get("files", {})) - set(trained))
        tr = entry.get("training", {})
        here = f"trained in this run: {', '.join(trained)} ({solvers.get('train_seconds')} s); " if trained else ""
        lines.append(f"Bespoke solvers: trained with the {tr.get('loss')} loss, {tr.get('iterations')} iterations x "
                     f"batch {tr.get('batch_size')}, lr {tr.get('lr')}, cached ground truth of "
                     f"{tr.get('cache_samples')} trajectories; {here}"
                     + (f"reused from solver files: {', '.join(reused)}." if reused else ""))
        lines.append("")
        best = {}
        for n in nfes:
            vals = [(as_number(rows[(m, n)]["rmse"]), m) for m in methods if (m, n) in rows]
            best[n] = min(vals)[1] if vals else None
        body = []
        for m in methods:
            cells = []
            for n in nfes:
                r = rows.get((m, n))
                cell = fmt_g(r["rmse"]) if r else ""
                cells.append(f"**{cell}**" if r and best[n] == m else cell)
            body.append([labels.get(m, m), *cells])
        lines += md_table(["method \\ NFE", *map(str, nfes)], body)
        adaptive = [r for r in entry.get("rows", []) if r["method"] == "dopri5"]
        if adaptive:
            runs = sorted(adaptive, key=lambda r: r["nfe"])
            lines += ["", "Adaptive dopri5 (NFE chosen by its controller): " + "; ".join(
                f"{r['label']}: NFE {r['nfe']}, RMSE {fmt_g(r['rmse'])}" for r in runs) + "."]
        metric = entry.get("distribution_metric")
        head = ["method", "NFE", "RMSE", "PSNR (dB)"] + ([metric] if metric else [])
        near = []
        for n in (10, 20):
            for m in methods:
                r = rows.get((m, n))
                if r:
                    near.append([labels.get(m, m), str(n), fmt_g(r["rmse"]), fmt_g(r["psnr"], 4)]
                                + ([fmt_g((r.get("distribution") or {}).get(metric))] if metric else []))
        if near:
            gt_row = next((r for r in entry.get("rows", []) if r["method"] == "ground truth"), None)
            lines += ["", "At NFE 10 and 20" + (f" ({metric} of the ground truth itself: "
                                               f"{fmt_g((gt_row.get('distribution') or {}).get(metric))})"
                                               if metric and gt_row else "") + ":", ""]
            lines += md_table(head, near)
        if model in plots:
            lines += ["", f"![{model}: RMSE versus NFE]({plots[model]})"]
    return lines


def wallclock_markdown(name: str, w: dict, plot: Optional[str]) -> List[str]:
    labels = w.get("labels", {})
    lines = [f"## Wall-clock at equal NFE [{name}]{quick_mark(w)}", "",
             f"Seconds per batch (ms) for the same noise, {w.get('threads')} torch thread(s). "
             f"{w.get('statistic', '')}. \"x floor\": time over the model-evaluation floor's (NFE calls of the "
             "model alone) in the same round, median (IQR) over rounds; \"of medians\": the ratio of the two medians "
             "instead, which mixes fast and slow rounds (round times here are bimodal); \"flow_matching / this\" > 1: "
             "faster than flow_matching's ODESolver, per round likewise (and torchdiffeq). \"first call\": a single "
             "call before all others, not part of the medians.", ""]
    lines += [f"- {n}" for n in w.get("notes", [])]
    for key, wl in w.get("workloads", {}).items():
        stats = wl.get("stats", {})
        lines += ["", f"### {key}: {wl.get('model')}, batch {wl.get('batch')}, NFE {wl.get('nfe')}, "
                      f"{wl.get('rounds')} rounds", ""]
        body = [[labels.get(c, c), fmt_ms(s["median_s"]), fmt_ms(s["iqr_s"]), _with_iqr(s, "x_floor"),
                 fmt_x(s.get("x_floor_of_medians")), _with_iqr(s, "flow_matching_over_self"),
                 _with_iqr(s, "torchdiffeq_over_self"), fmt_ms(s.get("first_call_s"))]
                for c, s in stats.items()]
        lines += md_table(["contender", "median ms", "IQR ms", "x floor (IQR)", "x floor, of medians",
                         "flow_matching / this (IQR)", "torchdiffeq / this (IQR)", "first call ms"], body)
        dev = wl.get("same_samples_max_abs_diff", {})
        if dev:
            lines += ["", "Same samples: largest |difference| from bespoke_ext's midpoint result: "
                      + ", ".join(f"{labels.get(k, k)} {fmt_g(v, 2)}" for k, v in dev.items()) + "."]
    if plot:
        lines += ["", f"![overhead over the model-evaluation floor]({plot})"]
    return lines


_RUN_LABELS = {"cached": "Bespoke o2, cached", "online": "Bespoke o2, online", "nonstationary": "non-stationary, cached"}


def training_section(name: str, t: dict) -> List[str]:
    lines = [f"## Training cost [{name}]{quick_mark(t)}", "",
             f"One solver at NFE {t.get('nfe')} per row, the demo's budget for each model and family, a fresh cache "
             "folder per run (a cached run pays for building its cache); the training loss shows whether the "
             "ground-truth modes trained alike. Pretraining two ways: the card's wall-clock (measured once, under "
             "that day's load) and the card's pretraining loop timed in this run at the same thread count "
             "(a few iterations scaled to the card's, `bespoke_ext/models/pretraining_replay.py`): the share "
             "\"of pretraining now\" compares costs measured at the same machine speed.", ""]
    lines += [f"- {n}" for n in t.get("notes", [])]
    body = []
    for model, e in t.get("models", {}).items():
        pm, now = e.get("pretraining_machine", {}), e.get("pretraining_now") or {}
        for key, r in e.get("runs", {}).items():
            budget = f"{r.get('loss', e.get('loss'))}, {r.get('iterations', e.get('iterations'))} x " \
                     f"{r.get('batch_size', e.get('batch_size'))}"
            now_share = r.get("fraction_of_pretraining_now")
            body.append([model, _RUN_LABELS.get(key, key), budget, fmt_s(r["wall_seconds"]), fmt_s(r["gt_seconds"]),
                         f"{100 * r['fraction_of_pretraining']:.1f}%",
                         f"{100 * now_share:.1f}%" if now_share is not None else "-",
                         f"{fmt_g(r.get('loss_first'))} -> {fmt_g(r.get('loss_last'))}",
                         f"{fmt_s(e.get('pretraining_seconds'))} ({pm.get('torch_num_threads', '?')} thread(s))",
                         f"{fmt_s(now['seconds'])} ({now['threads']} thread(s))" if now else "-",
                         e.get("measured_at", "?")])
    if body:
        lines += [""] + md_table(["model", "solver, ground truth", "loss, iterations x batch", "wall-clock s",
                                  "of which GT s", "of card pretraining", "of pretraining now",
                                  "training loss: first -> last tenth", "card pretraining s", "pretraining now s",
                                  "measured"], body)
    return lines


def _with_iqr(stats: dict, key: str) -> str:
    return f"{fmt_x(stats.get(key))} ({fmt_g(stats.get(key + '_iqr'), 2)})" if key in stats else "-"


def sampling_cpu_section(data: dict) -> List[str]:
    lines = ["## sample() overhead (benchmarks/bench_sampling.py)", "",
             f"{data.get('workload', '')}; {data.get('threads', '?')} threads, torch {data.get('torch', '?')}. "
             f"Floor: {data.get('floor', '')}. Written by benchmarks/bench_sampling.py into sampling_cpu.json.", ""]
    body = []
    for batch, r in data.get("results", {}).items():
        ratios = r.get("ratio_to_floor_paired") or r.get("ratio_to_floor") or r.get("ratio_to_floor_median") or {}
        for name, med in r.get("median_s", {}).items():
            body.append([str(batch), name, fmt_ms(med), fmt_x(ratios.get(name))])
    return lines + md_table(["batch", "contender", "median ms", "x floor"], body)


def bench_training_section(data: dict) -> List[str]:
    m = data.get("machine", {})
    lines = ["## Bespoke training (benchmarks/bench_training.py)", "",
             f"Written by benchmarks/bench_training.py into training.json ({m.get('threads', '?')} threads, torch "
             f"{m.get('torch', '?')}): validation RMSE of the trained solver against its base method at the same NFE, "
             "the NFE the base method needs to match it (its RMSE-vs-NFE curve interpolated in log RMSE versus log "
             "NFE, bespoke_ext.compare.nfe_to_match), and the wall-clock of each training run.", ""]
    body = []
    for model, e in data.get("models", {}).items():
        runs = dict(e.get("runs", {}))
        runs.update({f"{gt} ground truth": r for gt, r in (e.get("cached_vs_online") or {}).items()})
        runs["default settings"] = e.get("default_run")
        for name, r in runs.items():
            if not isinstance(r, dict):  # summary numbers beside the runs (speed-ups, ratios)
                continue
            body.append([model, name, str(r.get("nfe", "-")), str(r.get("iterations", "-")), r.get("base_method", "-"),
                         fmt_g(r.get("base_rmse")), fmt_g(r.get("best_rmse")), fmt_x(r.get("ratio")),
                         _nfe_to_match(r), fmt_g(r.get("wall_s")), fmt_g(r.get("gt_s"))])
    return lines + md_table(["model", "run", "NFE", "iterations", "base", "base RMSE", "trained RMSE", "ratio",
                           "base NFE to match", "wall-clock s", "GT s"], body)


def _nfe_to_match(run: dict) -> str:
    """The base NFE to match, marked where it is not interpolated between measured points."""
    how = run.get("base_nfe_to_match_how") or ""
    if "base_nfe_to_match_how" in run and run.get("base_nfe_to_match") is None:
        return "not reached"
    nfe = as_number(run.get("base_nfe_to_match"))
    value = "-" if nfe is None else f"{nfe:.1f}"  # as stored: to 0.1
    if how.startswith("extrapolated"):
        return f"~{value} (extrapolated)"
    if how.startswith("already"):
        return f"<= {value}"
    return value


def gpu_section(res: Results) -> List[str]:
    lines = ["## GPU", ""]
    if not res.gpu_sampling and not res.gpu_ops:
        return lines + [f"GPU figures are missing: no session with a GPU has run `{GPU_RUN}` yet (it builds the "
                        "extension on the lent machine, runs the CUDA tests, the kernel benchmarks against device copy "
                        "bandwidth and benchmarks/gpu/sampling.py). Until its results are committed under "
                        "benchmarks/results/gpu-<date>/, the GPU targets are unmeasured."]
    for path, data in res.gpu_sampling:
        lines += [f"### {path.parent.name}: sampling ({data.get('machine', {}).get('gpu', '?')})", ""]
        lines += wallclock_markdown(path.parent.name, data, None)[2:]
    for path, _ in res.gpu_ops:
        lines += ["", f"### {path.parent.name}: kernels", "", path.read_text().strip()]
    return lines

