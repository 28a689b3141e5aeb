"""The `bespoke-ext` command: parses arguments, calls the library, prints.

    bespoke-ext demo       the main job on an embedded model: ground truth, trained Bespoke
                           solvers, and a table and figures against the usual solvers
    bespoke-ext train      learn a Bespoke solver for a model
    bespoke-ext train-pipeline   learn one for a diffusers pipeline, saved as its scheduler
    bespoke-ext sample     sample with a solver file or a baseline method
    bespoke-ext bench      the benchmark suite and its report
    bespoke-ext pretrain   (re)train an embedded model from its packaged data
    bespoke-ext info       build and environment facts (ops, devices, embedded models)

Each subcommand has its own file in this folder (cli/<name>.py: its arguments and how it calls the
library); this file only wires them together, and imports them lazily so that `bespoke-ext info`
works even where optional extras are missing.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# subcommand -> help; bespoke_ext.cli.<subcommand> defines add_<subcommand>_arguments and run_<subcommand>
# (a "-" in a subcommand is "_" in those names)
_SUBCOMMANDS = {
    "demo": "run the main job on an embedded model",
    "train": "train a Bespoke solver for a model",
    "train-pipeline": "train a solver for a diffusers pipeline (saved as a BespokeScheduler)",
    "sample": "sample with a solver file or a method",
    "bench": "run the benchmark suite and write its report",
    "pretrain": "retrain an embedded model or an FCD classifier",
    "info": "print build and environment facts",
}


def _module(name: str):
    return importlib.import_module(f"{__package__}.{name.replace('-', '_')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bespoke-ext", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in _SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            getattr(_module(name), f"add_{name.replace('-', '_')}_arguments")(p)
        except ImportError as e:
            p.set_defaults(_import_error=f"`bespoke-ext {name}` is unavailable: {e}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_import_error", None):
        print(args._import_error, file=sys.stderr)
        return 2
    try:
        return int(getattr(_module(args.command), f"run_{args.command.replace('-', '_')}")(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        # the package's errors name the problem: the message is what a user needs, not a traceback
        if os.environ.get("BESPOKE_EXT_TRACEBACK"):
            raise
        print(f"bespoke-ext {args.command}: error: {exc}\n(BESPOKE_EXT_TRACEBACK=1 shows where it was raised)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
