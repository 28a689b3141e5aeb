"""``bespoke-ext info``: build and environment facts (ops and their kernels, devices, embedded models)."""

from __future__ import annotations

import argparse

__all__ = ["add_info_arguments", "run_info"]


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    del parser  # no options


def run_info(args: argparse.Namespace) -> int:
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
