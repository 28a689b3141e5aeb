"""The kernel tables: a pytest-benchmark JSON of benchmarks/bench_ops.py turned into markdown and JSON.

    python -m bespoke_ext.bench.report_ops RAW.json [--out benchmarks/results/ops_cpu]

writes ``<stem>.md`` (included as written in REPORT.md) and ``<stem>.json`` (its rows and targets; the GPU
bandwidth target of report_targets.py reads it). ``bespoke-ext bench --only kernels`` calls
write_ops_report on the file it has just measured (kernels.py); benchmarks/gpu/run.sh runs the command above.

Ratios compare medians measured in the same rounds (higher is better for the fused op):
  in-place   eager in-place chain / fused_out      alloc   eager allocating / fused
  compiled   torch.compile (allocating) / fused_out
  copy BW    share of the copy bandwidth that fused_out reaches, moving (k + 1) * numel * elem_size
             bytes (each input read once, the output written once); the copy ran in the same run
             and moved as many bytes (the same cache level)
The targets of issue 10 are checked at the end (report_targets.kernel_targets).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .report_format import fmt_blank, md_table, shape_label
from .report_targets import kernel_targets

__all__ = ["KEY", "load_raw", "summarise", "raw_machine", "kernel_markdown", "write_ops_report", "main"]

KEY = ("op", "shape", "k", "dtype", "coeffs", "threads")  # one case; its variants are measured side by side
CASE_HEAD = ["shape", "k", "dtype", "coeffs", "threads"]


def load_raw(path) -> Tuple[dict, Dict[tuple, Dict[str, dict]]]:
    """The pytest-benchmark file and its benchmarks by case (KEY) and variant: median seconds and extra_info.
    A benchmark times its case's fused op (extra_info "variant") and holds the times of the other variants,
    measured in the same rounds, in extra_info "side_by_side" (files without it: one benchmark per variant)."""
    data = json.loads(Path(path).read_text())
    rows: Dict[tuple, Dict[str, dict]] = defaultdict(dict)
    for b in data["benchmarks"]:
        e = dict(b["extra_info"])
        others = e.pop("side_by_side", {})
        key = tuple(tuple(e[f]) if isinstance(e[f], list) else e[f] for f in KEY)
        rows[key][e["variant"]] = {"median": b["stats"]["median"], **e}
        for name, seconds in others.items():
            rows[key][name] = {"median": statistics.median(seconds), **e, "variant": name}
    return data, rows


def _ratio(v, num, den):
    if num in v and den in v:
        return round(v[num]["median"] / v[den]["median"], 2)
    return None


def summarise(rows) -> List[dict]:
    """One row per case: milliseconds per variant and the ratios of the tables."""
    out = []
    for key, v in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][5], str(kv[0][1:5]))):
        some = next(iter(v.values()))
        r = dict(zip(KEY, key))
        r["shape"] = list(r["shape"])
        r["size"] = some["size"]
        r.update({f"{name}_ms": round(x["median"] * 1e3, 4) for name, x in v.items()})
        r["load1_max"] = round(max(x.get("load1", 0.0) for x in v.values()), 1)
        r["cache"] = some.get("cache")  # None in files from before the cold-cache timing
        if r["op"] == "rk_update":
            r["inplace_over_out"] = _ratio(v, "eager_inplace", "fused_out")
            r["eager_over_fused"] = _ratio(v, "eager", "fused")
            r["compiled_over_out"] = _ratio(v, "compiled", "fused_out")
            if "copy" in v and "fused_out" in v:
                # bytes/s of a plain copy; moving as many bytes as the update (older files: numel elements)
                copied = v["copy"].get("copy_numel") or r["size"]
                bw = 2 * copied * some["elem_size"] / v["copy"]["median"]
                r["copy_GBps"] = round(bw / 1e9, 2)
                floor = (r["k"] + 1) * r["size"] * some["elem_size"] / bw
                r["out_of_copy_bw"] = round(floor / v["fused_out"]["median"], 2)
        else:
            r["eager_over_fused"] = _ratio(v, "eager", "fused")
            r["compiled_over_fused"] = _ratio(v, "compiled", "fused")
        out.append(r)
    return out


def raw_machine(data: dict, rows) -> dict:
    """Where the benchmarks ran, from pytest-benchmark's machine_info (benchmarks/conftest.py adds torch)."""
    info = data.get("machine_info", {})
    some = next(iter(next(iter(rows.values())).values()))
    return {"node": info.get("node", platform.node()),
            "cpu": info.get("cpu", {}).get("brand_raw", platform.processor()),
            "torch": info.get("torch", "?"), "device": some.get("device", "cpu")}


def _table(summary: Sequence[dict], op: str, fields: Sequence[Tuple[str, str]]) -> List[str]:
    rows = [[shape_label(r["shape"]), *(str(r[f]) for f in CASE_HEAD[1:]), *(fmt_blank(r.get(f)) for _, f in fields)]
            for r in summary if r["op"] == op]
    head = CASE_HEAD + [label for label, _ in fields]
    return md_table(head, rows, "l" * len(head))


def _cache_line(summary: Sequence[dict]) -> str:
    modes = {r.get("cache") for r in summary}
    if modes == {"cold"}:
        return ("Every timed call of a case larger than the L2 starts with cold caches (a 64 MiB buffer written "
                "before it, untimed); smaller cases run warm.")
    if modes == {"warm"}:
        return "Timed calls run back to back (caches warm from the previous variant)."
    return ""


def kernel_markdown(summary: Sequence[dict], machine: dict) -> str:
    """The ops_<machine>.md text: the rk_update, rk_residual and rk_update_backward tables and the targets."""
    loads = [r["load1_max"] for r in summary]
    lines = [
        f"Kernel benchmarks on {machine['node']} ({machine['cpu']}, torch {machine['torch']}, device "
        f"{machine['device']}). Medians; every ratio is within one run. 1-minute load average during the run: "
        f"median {statistics.median(loads)}, max {max(loads)} (the machine is shared: with a load above the "
        f"core count, absolute times are noisy and ratios less so). {_cache_line(summary)}",
        "",
        "### rk_update",
        "",
    ]
    lines += _table(summary, "rk_update", [
        ("fused_out ms", "fused_out_ms"), ("in-place / out", "inplace_over_out"),
        ("alloc: eager / fused", "eager_over_fused"), ("compiled / out", "compiled_over_out"),
        ("out: copy BW share", "out_of_copy_bw"), ("copy GB/s", "copy_GBps")])
    for op in ("rk_residual", "rk_update_backward"):
        lines += ["", f"### {op}", ""]
        lines += _table(summary, op, [("fused ms", "fused_ms"), ("eager / fused", "eager_over_fused"),
                                      ("compiled / fused", "compiled_over_fused")])
    lines += ["", "### Targets (issue 10)", ""] + kernel_targets(summary)
    return "\n".join(lines) + "\n"


def write_ops_report(raw, stem=None) -> Tuple[Path, Path, str]:
    """Write ``<stem>.json`` and ``<stem>.md`` from the pytest-benchmark file ``raw`` (default stem: ``raw``
    without its ``_raw.json``); returns both paths and the markdown."""
    data, rows = load_raw(raw)
    if not rows:
        raise ValueError(f"{raw} holds no benchmarks of benchmarks/bench_ops.py")
    machine = raw_machine(data, rows)
    summary = summarise(rows)
    stem = Path(stem) if stem is not None else Path(str(raw).replace("_raw.json", ""))
    text = kernel_markdown(summary, machine)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    twin = {"machine": machine, "rows": summary, "targets": kernel_targets(summary)}
    json_path.write_text(json.dumps(twin, indent=1))
    md_path.write_text(text)
    return md_path, json_path, text


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bespoke_ext.bench.report_ops", description=__doc__.splitlines()[0])
    ap.add_argument("raw", help="pytest-benchmark JSON of benchmarks/bench_ops.py (--benchmark-json)")
    ap.add_argument("--out", default=None, help="output stem (default: next to RAW without _raw)")
    args = ap.parse_args(argv)
    print(write_ops_report(args.raw, args.out)[2])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
