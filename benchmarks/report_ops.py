"""Turns a pytest-benchmark JSON of bench_ops.py into the kernel table (markdown + JSON).

    python benchmarks/report_ops.py RAW.json [--out benchmarks/results/ops_cpu]

Ratios compare medians measured side by side in the same run. "of copy BW" is the share of
the copy bandwidth (measured in the same run on the same size) that the op achieves, moving
(k + 1) * N * elem_size bytes (each input read once, the output written once).
"""

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path


def load(path):
    data = json.loads(Path(path).read_text())
    rows = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        key = (e["op"], e["dtype"], e["size"])
        rows[key][e["variant"]] = {"median": b["stats"]["median"], "iqr": b["stats"]["iqr"], **e}
    return data, rows


def summarise(rows):
    out = []
    for (op, dtype, size), v in sorted(rows.items()):
        r = {"op": op, "dtype": dtype, "size": size}
        r.update({f"{name}_ms": round(x["median"] * 1e3, 4) for name, x in v.items()})
        if "fused" in v and "eager" in v:
            r["eager_over_fused"] = round(v["eager"]["median"] / v["fused"]["median"], 2)
        if "fused" in v and "compiled" in v:
            r["compiled_over_fused"] = round(v["compiled"]["median"] / v["fused"]["median"], 2)
        if op == "rk_update" and "copy" in v:
            k, es = v["copy"]["k"], v["copy"]["elem_size"]
            bw = 2 * size * es / v["copy"]["median"]  # bytes/s of a plain copy
            r["copy_GBps"] = round(bw / 1e9, 2)
            floor = (k + 1) * size * es / bw
            for name in ("fused", "fused_out"):
                if name in v:
                    r[f"{name}_of_copy_bw"] = round(floor / v[name]["median"], 3)
        out.append(r)
    return out


def markdown(summary, machine):
    lines = [f"Kernel benchmarks on {machine['node']} ({machine['cpu']}, {machine['threads']} threads, "
             f"torch {machine['torch']}, device {machine['device']}). Medians; ratios within one run.", ""]
    lines.append("| op | dtype | elements | fused ms | out ms | eager ms | compiled ms | eager/fused | compiled/fused | out: share of copy BW |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in summary:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {r['size']:.1e} | {r.get('fused_ms', '')} | {r.get('fused_out_ms', '')} | "
            f"{r.get('eager_ms', '')} | {r.get('compiled_ms', '')} | {r.get('eager_over_fused', '')} | "
            f"{r.get('compiled_over_fused', '')} | {r.get('fused_out_of_copy_bw', '')} |"
        )
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
               "threads": info.get("torch_threads", "?"), "torch": info.get("torch", "?"), "device": some.get("device", "cpu")}
    summary = summarise(rows)
    stem = Path(args.out) if args.out else Path(str(Path(args.raw)).replace("_raw.json", ""))
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "rows": summary}, indent=1))
    stem.with_suffix(".md").write_text(markdown(summary, machine))
    print(markdown(summary, machine))


if __name__ == "__main__":
    main()
