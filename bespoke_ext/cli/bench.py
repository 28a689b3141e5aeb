"""``bespoke-ext bench``: the benchmark suite and its report (stages: bespoke_ext/bench/suite.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.suite import STAGES

__all__ = ["add_bench_arguments", "run_bench"]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``bespoke-ext bench``."""
    parser.add_argument("--quick", action="store_true",
                        help="a short smoke run (tiny batches, rounds and training: the numbers are not meaningful); "
                             "writes to the results folder's quick/ subfolder by default")
    parser.add_argument("--only", nargs="+", choices=STAGES, metavar="STAGE",
                        help=f"run only these stages ({', '.join(STAGES)}); default: all")
    parser.add_argument("--out", default=None,
                        help="results folder (default: benchmarks/results in a source checkout, else ./bespoke-bench)")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """Run the suite from parsed arguments. Returns 0."""
    from ..bench import default_out, run

    out = Path(args.out) if args.out else default_out(args.quick)
    run(args.only or STAGES, quick=args.quick, out=out, models=args.models, solver_dirs=args.solvers,
        threads=args.threads, seed=args.seed, machine=args.machine, report=not args.no_report,
        progress=not args.no_progress)
    return 0
