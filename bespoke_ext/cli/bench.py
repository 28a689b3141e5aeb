"""``bespoke-ext bench``: the benchmark suite and its report (stages: bespoke_ext/bench/suite.py).

    bespoke-ext bench                                  measure every stage into ./bespoke-bench, then report
    bespoke-ext bench --out benchmarks/results         refresh the committed results of a source checkout
    bespoke-ext bench --report-only --out benchmarks/results --readme README.md
                                                       regenerate REPORT.md, its plots and the README's
                                                       performance section from the results, measuring nothing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..bench.suite import STAGES

__all__ = ["add_bench_arguments", "run_bench"]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``bespoke-ext bench``."""
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (tiny batches, rounds and training: the numbers are not meaningful); "
                             "writes to ./bespoke-bench/quick by default")
    parser.add_argument("--only", nargs="+", choices=STAGES, metavar="STAGE",
                        help=f"run only these stages ({', '.join(STAGES)}); default: all. kernels: "
                             "benchmarks/bench_ops.py (pytest-benchmark; a source checkout only), the fused ops "
                             "against eager PyTorch, torch.compile and copy bandwidth at 1 and 2 threads, tabled in "
                             "<out>/ops_<machine>.md")
    parser.add_argument("--out", default=None,
                        help="results folder (default: ./bespoke-bench in the current directory; "
                             "--out benchmarks/results refreshes the results committed in a source checkout)")
    parser.add_argument("--models", nargs="+", default=None, metavar="NAME",
                        help="models for the quality and training stages (default: every embedded model and the "
                             "oracle, oracle-gmm64, for quality; the default embedded model for training)")
    parser.add_argument("--solvers", nargs="+", default=[], metavar="DIR",
                        help="more folders holding trained solver files to reuse (DIR/solvers/bespoke-rk2-nfe10."
                             "safetensors, as the demo writes them); ./bespoke-demo is always searched")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for the whole run (default: half the cores, as the demo)")
    parser.add_argument("--machine", default=None,
                        help="name of the results file (default: derived from the CPU, e.g. cpu-amd-epyc-2c)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every noise batch and training run (default 0)")
    parser.add_argument("--no-report", action="store_true", help="only write the results file, not REPORT.md")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: regenerate REPORT.md, its plots and readme_performance.md from the "
                             "results files already in --out")
    parser.add_argument("--readme", default=None, metavar="README",
                        help="also put the performance section into this README, between its performance markers")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run the suite (or, with --report-only, only the report) from parsed arguments. Returns 0, or 2 for
    contradictory options or a missing results folder."""
    from ..bench import default_out, run

    out = Path(args.out) if args.out else default_out(args.quick)
    if args.report_only and (args.only or args.no_report):
        print("--report-only measures nothing: it cannot be combined with --only or --no-report", file=sys.stderr)
        return 2
    if args.readme and args.no_report:
        print("--readme needs the report: drop --no-report", file=sys.stderr)
        return 2
    if args.readme:
        from ..bench.readme import check_readme

        check_readme(args.readme)   # before the measurements, not after them
    if args.report_only:
        from ..bench.results import load_results

        found = load_results(out) if out.is_dir() else None
        if found is None or not (found.bench or found.ops_tables or found.sampling_cpu or found.training
                                 or found.gpu_sampling or found.gpu_ops):
            print(f"no results in {out}: run `bespoke-ext bench` first, or name its folder with --out", file=sys.stderr)
            return 2
        from ..bench.report import write_report

        for path in write_report(out):
            print(f"wrote {path}")
    else:
        run(args.only or STAGES, quick=args.quick, out=out, models=args.models, solver_dirs=args.solvers,
            threads=args.threads, seed=args.seed, machine=args.machine, report=not args.no_report,
            progress=not args.no_progress)
    if args.readme:
        from ..bench.readme import insert_readme_section

        insert_readme_section(args.readme, (out / "readme_performance.md").read_text())
        print(f"updated the performance section of {args.readme}")
    return 0
