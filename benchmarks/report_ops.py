"""Turns a pytest-benchmark JSON of bench_ops.py into the kernel tables (markdown + JSON).

    python benchmarks/report_ops.py RAW.json [--out benchmarks/results/ops_cpu]

Ratios compare medians measured in the same run (higher is better for the fused op):
  in-place   eager in-place chain / fused_out      alloc   eager allocating / fused
  compiled   torch.compile (allocating) / fused_out
  copy BW    share of the copy bandwidth (same run, same size) that fused_out reaches, moving
             (k + 1) * numel * elem_size bytes (each input read once, the output written once)
The targets of issue 10 are checked at the end.
"""

import argparse
import json
import platform
import statistics
from collections import defaultdict
from pathlib import Path

KEY = ("op", "shape", "k", "dtype", "coeffs", "threads")


def load(path):
    data = json.loads(Path(path).read_text())
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        key = tuple(tuple(e[f]) if isinstance(e[f], list) else e[f] for f in KEY)
        rows[key][e["variant"]] = {"median": b["stats"]["median"], **e}
    return data, rows


def _ratio(v, num, den):
    if num in v and den in v:
        return round(v[num]["median"] / v[den]["median"], 2)
    return None


def summarise(rows):
    out = []
    for key, v in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][5], str(kv[0][1:5]))):
        some = next(iter(v.values()))
        r = dict(zip(KEY, key))
        r["shape"] = list(r["shape"])
        r["size"] = some["size"]
        r.update({f"{name}_ms": round(x["median"] * 1e3, 4) for name, x in v.items()})
        r["load1_max"] = round(max(x.get("load1", 0.0) for x in v.values()), 1)
        if r["op"] == "rk_update":
            r["inplace_over_out"] = _ratio(v, "eager_inplace", "fused_out")
            r["eager_over_fused"] = _ratio(v, "eager", "fused")
            r["compiled_over_out"] = _ratio(v, "compiled", "fused_out")
            if "copy" in v and "fused_out" in v:
                bw = 2 * r["size"] * some["elem_size"] / v["copy"]["median"]  # bytes/s of a plain copy
                r["copy_GBps"] = round(bw / 1e9, 2)
                floor = (r["k"] + 1) * r["size"] * some["elem_size"] / bw
                r["out_of_copy_bw"] = round(floor / v["fused_out"]["median"], 2)
        else:
            r["eager_over_fused"] = _ratio(v, "eager", "fused")
            r["compiled_over_fused"] = _ratio(v, "compiled", "fused")
        out.append(r)
    return out


def _fmt(x):
    return "" if x is None else str(x)


def _name(r):
    return f"{'x'.join(map(str, r['shape']))} k={r['k']} {r['dtype']} {r['coeffs']}"


def targets(summary):
    """The issue's CPU targets, as met / missed with the worst case."""
    up = [r for r in summary if r["op"] == "rk_update"]
    lines = []

    def check(label, cases, field, bound):
        cases = [r for r in cases if r.get(field) is not None]
        if not cases:
            return
        worst = min(cases, key=lambda r: r[field])
        ok = worst[field] >= bound
        lines.append(f"- {label}: {'met' if ok else 'MISSED'}; worst {worst[field]} at {_name(worst)}, "
                     f"{worst['threads']} thread(s) (median over cases {statistics.median(r[field] for r in cases)})")

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


def markdown(summary, machine):
    loads = [r["load1_max"] for r in summary]
    lines = [
        f"Kernel benchmarks on {machine['node']} ({machine['cpu']}, torch {machine['torch']}, device "
        f"{machine['device']}). Medians; every ratio is within one run. 1-minute load average during the run: "
        f"median {statistics.median(loads)}, max {max(loads)} (the machine is shared: with a load above the "
        f"core count, absolute times are noisy and ratios less so).",
        "",
        "### rk_update",
        "",
        "| shape | k | dtype | coeffs | threads | fused_out ms | in-place / out | alloc: eager / fused | compiled / out | out: copy BW share | copy GB/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary:
        if r["op"] != "rk_update":
            continue
        lines.append(
            f"| {'x'.join(map(str, r['shape']))} | {r['k']} | {r['dtype']} | {r['coeffs']} | {r['threads']} | "
            f"{_fmt(r.get('fused_out_ms'))} | {_fmt(r.get('inplace_over_out'))} | {_fmt(r.get('eager_over_fused'))} | "
            f"{_fmt(r.get('compiled_over_out'))} | {_fmt(r.get('out_of_copy_bw'))} | {_fmt(r.get('copy_GBps'))} |"
        )
    for op in ("rk_residual", "rk_update_backward"):
        lines += ["", f"### {op}", "", "| shape | k | dtype | coeffs | threads | fused ms | eager / fused | compiled / fused |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in summary:
            if r["op"] == op:
                lines.append(
                    f"| {'x'.join(map(str, r['shape']))} | {r['k']} | {r['dtype']} | {r['coeffs']} | {r['threads']} | "
                    f"{_fmt(r.get('fused_ms'))} | {_fmt(r.get('eager_over_fused'))} | {_fmt(r.get('compiled_over_fused'))} |"
                )
    lines += ["", "### Targets (issue 10)", ""] + targets(summary)
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("--out", default=None, help="output stem (default: next to RAW without _raw)")
    args = ap.parse_args()
    data, rows = load(args.raw)
    info = data.get("machine_info", {})
    some = next(iter(next(iter(rows.values())).values()))
    machine = {"node": info.get("node", platform.node()), "cpu": info.get("cpu", {}).get("brand_raw", platform.processor()),
               "torch": info.get("torch", "?"), "device": some.get("device", "cpu")}
    summary = summarise(rows)
    stem = Path(args.out) if args.out else Path(str(Path(args.raw)).replace("_raw.json", ""))
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": summary, "targets": targets(summary)}, indent=1))
    stem.with_suffix(".md").write_text(markdown(summary, machine))
    print(markdown(summary, machine))


if __name__ == "__main__":
    main()
