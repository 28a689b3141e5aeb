"""The README's "## Performance" section: headline tables rendered from a results folder, and the
function that puts that section between the README's markers."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from .report_format import fmt_g, fmt_ms, fmt_s, fmt_x, machine_line, md_table, quick_mark
from .report_targets import targets
from .results import FIXED_ORDER, Results, method_labels, rows_by_method_nfe

__all__ = ["render_readme_section", "insert_readme_section", "check_readme", "README_BEGIN", "README_END"]

README_BEGIN_PREFIX = "<!-- performance:begin"
README_BEGIN = (f"{README_BEGIN_PREFIX} (generated from benchmarks/results by `bespoke-ext bench --report-only "
                "--out benchmarks/results --readme README.md`; do not edit) -->")
README_END = "<!-- performance:end -->"


def _time_and_ratio(stats: dict, contender: str) -> str:
    s = stats.get(contender)
    return f"{fmt_ms(s['median_s'])} ms ({fmt_x(s['x_floor'])})" if s else "-"


def render_readme_section(res: Results) -> str:
    """The README's performance section: headline tables from the results, a link to REPORT.md."""
    lines = ["## Performance", ""]
    cpu = next(((n, m) for n, m in res.bench.items() if not m.get("machine", {}).get("gpu")), None)
    if cpu is None:
        return "\n".join(lines + ["No benchmark results yet: run `bespoke-ext bench`."]) + "\n"
    name, m = cpu
    lines += [f"Measured with `bespoke-ext bench` on {machine_line(m)}. Timings are medians of interleaved "
              "rounds on a shared machine, and every ratio compares contenders measured side by side in one run. "
              "Full tables with spreads, plots and the kernel tables: "
              "[benchmarks/results/REPORT.md](benchmarks/results/REPORT.md).", ""]
    q = m.get("quality")
    if q:
        lines += ["**Quality at NFE 10**: RMSE against the ground truth from the same noise (lower is better)"
                  f"{quick_mark(q)}.", ""]
        measured = {model: rows_by_method_nfe(entry) for model, entry in q.get("models", {}).items()}
        # RK4 cannot make exactly 10 evaluations; a method no model has a row for gets no column
        cols = [c for c in FIXED_ORDER if c != "rk4" and any((c, 10) in rows for rows in measured.values())]
        labels: Dict[str, str] = {}
        body = []
        for model, entry in q.get("models", {}).items():
            rows = measured[model]
            labels.update(method_labels(entry))
            body.append([model, *(fmt_g(rows[(c, 10)]["rmse"]) if (c, 10) in rows else "-" for c in cols)])
        # the method's name only: what a label adds for one model ("..., OT form on a VP model") is in REPORT.md
        lines += md_table(["model", *(labels.get(c, c).split(",")[0] for c in cols)], body)
        lines.append("")
    w = m.get("wallclock")
    if w:
        lines += [f"**Sampling wall-clock** per batch at equal NFE, and over the model-evaluation floor "
                  f"({w.get('threads')} torch thread(s)){quick_mark(w)}.", ""]
        body = [[f"{wl['model']}, batch {wl['batch']}", str(wl["nfe"]),
                 *(_time_and_ratio(wl["stats"], c) for c in ("bespoke_ext", "bespoke", "flow_matching", "torchdiffeq",
                                                             "diffusers-dpm++2m", "plain_loop")),
                 fmt_x(wl["stats"].get("bespoke_ext", {}).get("flow_matching_over_self"))]
                for wl in w.get("workloads", {}).values()]
        lines += md_table(["model", "NFE", "sample() midpoint", "sample() Bespoke", "flow_matching", "torchdiffeq",
                         "diffusers DPM++", "plain loop", "speed-up vs flow_matching"], body)
        lines.append("")
    # training cost is a ratio within one run, so it may come from another CPU machine than the tables above
    trained = [(n, x) for n, x in res.bench.items() if not x.get("machine", {}).get("gpu")
               and (x.get("training") or {}).get("models")]
    t_name, t_m = next(((n, x) for n, x in trained if n == name), trained[0] if trained else (name, m))
    t = t_m.get("training")
    if t and t.get("models"):
        where = f", on {machine_line(t_m)}" if t_name != name else ""
        lines += [f"**Training cost** of one NFE-{t.get('nfe')} solver (ground truth included), as a share of the "
                  f"model's pretraining timed in the same run{where}; in brackets, of the card's wall-clock"
                  f"{quick_mark(t)}.", ""]
        def share(run: Optional[dict]) -> str:
            if not run:
                return "-"
            now = run.get("fraction_of_pretraining_now")
            return (f"{fmt_s(run['wall_seconds'])} s: {f'{100 * now:.1f}%' if now is not None else '-'} "
                    f"({100 * run['fraction_of_pretraining']:.1f}%)")

        body = [[model, share(e["runs"].get("cached")), share(e["runs"].get("online")),
                 share(e["runs"].get("nonstationary")),
                 f"{fmt_s((e.get('pretraining_now') or {}).get('seconds'))} s ({fmt_s(e['pretraining_seconds'])} s)"]
                for model, e in t["models"].items()]
        lines += md_table(["model", "Bespoke o2, cached ground truth", "Bespoke o2, online", "non-stationary, cached",
                           "pretraining now (card)"], body)
        lines.append("")
    lines += ["**Targets**:", ""]
    lines += [f"- {target}: {measured}; {status}" for target, measured, status in targets(res)]
    return "\n".join(lines) + "\n"


def insert_readme_section(readme, section: str) -> None:
    """Replace what lies between the begin marker and README_END in ``readme`` with ``section``.

    The begin marker is any line opening with ``<!-- performance:begin``; it is rewritten as README_BEGIN,
    so a README still carrying an older wording of the marker is brought up to date."""
    path = Path(readme)
    text = path.read_text()
    start, marker_end = _markers(path, text)
    head, rest = text[:start], text[marker_end + len("-->"):]
    _, tail = rest.split(README_END, 1)
    path.write_text(f"{head}{README_BEGIN}\n{section.rstrip()}\n{README_END}{tail}")


def check_readme(readme) -> None:
    """ValueError unless ``readme`` is a readable file with the section's markers (checked before a bench
    run, so that the run's end does not fail on it)."""
    path = Path(readme)
    if not path.is_file():
        raise ValueError(f"--readme {path}: no such file")
    _markers(path, path.read_text())


def _markers(path: Path, text: str):
    """(start of the begin marker, start of its closing -->), or ValueError."""
    start = text.find(README_BEGIN_PREFIX)
    marker_end = text.find("-->", start) if start >= 0 else -1
    if start < 0 or marker_end < 0 or README_END not in text[marker_end:]:
        raise ValueError(f"{path} lacks the markers; put these two lines where the performance section goes:\n"
                         f"{README_BEGIN}\n{README_END}")
    return start, marker_end
