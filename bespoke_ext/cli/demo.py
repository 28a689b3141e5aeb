"""``bespoke-ext demo``: the whole method on an embedded model, against the solvers a user would pick."""

from __future__ import annotations

import argparse

from ..demo.presets import LOSSES

__all__ = ["add_demo_arguments", "run_demo"]


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``bespoke-ext demo``."""
    parser.add_argument("--model", default=None,
                        help="embedded model (default: the shipped MNIST model; flux_mnist: the diffusers FluxPipeline "
                             "demo); see `bespoke-ext info`")
    parser.add_argument("--nfe", type=int, nargs="+", default=[8, 10], metavar="N",
                        help="NFEs to train Bespoke solvers for, each even (order 2 takes 2 per step); default 8 10")
    parser.add_argument("--out", default="bespoke-demo", help="output folder (default ./bespoke-demo)")
    parser.add_argument("--batch", type=int, default=None, help="evaluation batch size (default: the model's preset)")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations per scale-time (order 1 / 2) solver (default: preset; the "
                                                            "non-stationary solvers keep their preset's)")
    parser.add_argument("--loss", choices=LOSSES, default=None,
                        help="Bespoke training loss: end_to_end (the default of most presets), bound (the paper's) "
                             "or log_mse (mnist_cond's preset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise and of training (default 0)")
    parser.add_argument("--quick", action="store_true", help="a reduced smoke run: tiny batch and training")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: half the cores, at least 1)")
    parser.add_argument("--guidance", type=float, default=None, metavar="G",
                        help="classifier-free guidance scale g of a class-conditional model (default 2; "
                             "g = 1 is the conditional model itself); for a diffusers-format model, FluxPipeline's "
                             "true_cfg_scale against the null prompt (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo from parsed arguments; prints the table and summary. Returns 0. A diffusers-format
    embedded model (flux_mnist) runs the pipeline demo (demo/pipeline_demo.py): its FluxPipeline with the
    Bespoke scheduler next to FlowMatchEuler and midpoint."""
    from ..demo.pipeline_demo import is_pipeline_model

    if is_pipeline_model(args.model):
        from ..demo.pipeline_demo import run as run_pipeline

        run_pipeline(model=args.model, nfe=args.nfe, out=args.out, batch=args.batch, iterations=args.iterations,
                     loss=args.loss, seed=args.seed, quick=args.quick, progress=not args.no_progress,
                     threads=args.threads, guidance=args.guidance)
        return 0
    from ..demo import run

    run(model=args.model, nfe=args.nfe, out=args.out, batch=args.batch, iterations=args.iterations, loss=args.loss,
        seed=args.seed, quick=args.quick, progress=not args.no_progress, threads=args.threads, guidance=args.guidance)
    return 0
