"""The ``bespoke-ext`` command: main.py wires the subcommands, one file each."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
