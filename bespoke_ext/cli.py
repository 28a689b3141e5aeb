"""The `bespoke-ext` command: parses arguments, calls the library, prints.

    bespoke-ext demo       the main job on an embedded model: ground truth, trained Bespoke
                           solvers, and a table and figures against the usual solvers
    bespoke-ext train      learn a Bespoke solver for a model
    bespoke-ext sample     sample with a solver file or a baseline method
    bespoke-ext bench      the benchmark suite and its report
    bespoke-ext pretrain   (re)train an embedded model from its packaged data
    bespoke-ext info       build and environment facts (ops, devices, embedded models)

Each subcommand lives with the code it drives; this file only wires them together, and
imports them lazily so that `bespoke-ext info` works even where optional extras are missing.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module, add-arguments function, run function, help)
_SUBCOMMANDS = {
    "demo": ("bespoke_ext.evaluation.demo", "add_demo_arguments", "run_demo", "run the main job on an embedded model"),
    "train": ("bespoke_ext.training.cli_train", "add_train_arguments", "run_train", "train a Bespoke solver for a model"),
    "sample": ("bespoke_ext.sampling.cli_sample", "add_sample_arguments", "run_sample", "sample with a solver file or a method"),
    "bench": ("bespoke_ext.evaluation.bench", "add_bench_arguments", "run_bench", "run the benchmark suite and write its report"),
    "pretrain": ("bespoke_ext.models.pretrain", "add_pretrain_arguments", "run_pretrain", "retrain an embedded model"),
    "info": ("bespoke_ext.cli", "_add_info_arguments", "_run_info", "print build and environment facts"),
}


def _add_info_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def _run_info(args: argparse.Namespace) -> int:
    del args
    import platform

    import torch

    import bespoke_ext
    from bespoke_ext import ops  # noqa: F401  (loads the kernels)

    print(f"bespoke_ext {bespoke_ext.__version__}  torch {torch.__version__}  python {platform.python_version()}")
    print(f"threads: {torch.get_num_threads()}  CUDA available: {torch.cuda.is_available()}")
    for op in ("rk_update", "rk_update_out", "rk_residual", "rk_update_backward", "rk_residual_backward"):
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"bespoke_ext::{op}", k)]
        print(f"  bespoke_ext::{op:<22} kernels: {', '.join(keys)}")
    try:
        from bespoke_ext.models.embedded import list_embedded

        print("embedded models:", ", ".join(list_embedded()))
    except ImportError as e:  # optional extras missing
        print(f"embedded models: unavailable ({e})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bespoke-ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, add_fn, _, help_text) in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            getattr(importlib.import_module(module), add_fn)(p)
        except ImportError as e:
            p.set_defaults(_import_error=f"`bespoke-ext {name}` is unavailable: {e}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_import_error", None):
        print(args._import_error, file=sys.stderr)
        return 2
    module, _, run_fn, _ = _SUBCOMMANDS[args.command]
    try:
        return int(getattr(importlib.import_module(module), run_fn)(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
