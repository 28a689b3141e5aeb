"""``bespoke-ext train``: train a Bespoke solver for a model from the command line.

    bespoke-ext train moons2d --steps 5 --order 2 --iterations 300      (NFE 10; --nfe 10 says the same)
    bespoke-ext train moons2d --solver nonstationary --nfe 10 --batch-size 64 --iterations 600
    bespoke-ext train moons2d --solver nonstationary --init bespoke-moons2d-rk2-nfe10.safetensors
    bespoke-ext train mypackage.models:make_model --shape 1,28,28 -o solver.safetensors
    bespoke-ext train path/to/model.safetensors          (an embedded-style model: weights + JSON card)
    bespoke-ext train mnist_cond --guidance 2            (class-conditional: every label, guided; cli/conditioning.py)
    bespoke-ext train mypackage.models:make_model --conditions prompts.safetensors   (a pool of per-sample inputs)

The model is ``module:attribute``, a checkpoint file with its JSON card, or an embedded model's name
(cli/model_spec.py). Writes the solver file (data only) and a learning-curve PNG next to it; prints the validation RMSE of
the base method (iteration 0) and of the trained solver. Under torchrun only rank 0 writes.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..training.options import GT_MODES, LOSSES, LR_SCHEDULES, TrainOptions
from .conditioning import add_condition_arguments, conditioning, training_pool
from .model_spec import DTYPES, parse_extras, parse_shape, resolve_model
from .paths import writable_file

__all__ = ["add_train_arguments", "run_train"]

SOLVERS = ("bespoke", "nonstationary")

_DEFAULTS = TrainOptions()


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand's arguments to ``parser``."""
    parser.add_argument("model", help="module:attribute (a model or a zero-argument factory), a model checkpoint "
                                      "file (.safetensors with its .json card), or an embedded model name")
    parser.add_argument("--shape", default=None, help="per-sample shape, e.g. 2 or 1,28,28 (default: the model's .shape)")
    parser.add_argument("--solver", choices=SOLVERS, default="bespoke",
                        help="bespoke: the scale-time BespokeSolver (--steps, --order); nonstationary: the non-stationary "
                             "family (method.md §9; --nfe, --base), trained with the log-MSE loss unless --loss says")
    parser.add_argument("--steps", type=int, default=None, help="bespoke: solver steps n (default 5, or --nfe / order)")
    parser.add_argument("--order", type=int, default=None, choices=(1, 2),
                        help="bespoke: 1: Euler base (NFE n); 2: midpoint base (NFE 2n) (default 2)")
    parser.add_argument("--nfe", type=int, default=None,
                        help="model evaluations (default 10); bespoke: steps = nfe / order")
    parser.add_argument("--base", choices=("euler", "midpoint"), default=None,
                        help="nonstationary: the method a fresh solver equals (default euler)")
    parser.add_argument("--init", default=None, metavar="FILE",
                        help="start from this solver file (a BespokeSolver is converted exactly for --solver nonstationary); "
                             "--steps, --order, --nfe, when given, must match it, and --base is for fresh solvers")
    parser.add_argument("--iterations", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=256, help="noise samples per iteration (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", default=None,
                        help="solver file (default bespoke-<model>-<rk<order> | ns>-nfe<NFE>.safetensors)")
    parser.add_argument("--plot", default=None, help="learning-curve PNG (default: the solver file with .png)")
    g = parser.add_argument_group("training options (see bespoke_ext.training.TrainOptions)")
    g.add_argument("--lr", type=float, default=None,
                   help=f"default {_DEFAULTS.lr:g}; nonstationary (fitted by least squares first): 0.01 / NFE")
    g.add_argument("--L-tau", dest="L_tau", type=float, default=_DEFAULTS.L_tau)
    g.add_argument("--loss", choices=LOSSES, default=None,
                   help=f"default {_DEFAULTS.loss} for bespoke, log_mse for nonstationary")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None)
    g.add_argument("--grad-clip", type=float, default=None)
    g.add_argument("--gt", choices=GT_MODES, default=_DEFAULTS.gt, help="ground truth: cached trajectories or online solves")
    g.add_argument("--gt-tol", type=float, default=_DEFAULTS.gt_rtol, help="dopri5 rtol = atol of the ground truth (<= 1e-5)")
    g.add_argument("--cache-dir", default=None,
                   help="folder of the cached ground truth (default: one per model and settings under "
                        "$BESPOKE_EXT_CACHE_DIR, else $XDG_CACHE_HOME/bespoke_ext/trajectories, ~/.cache by default)")
    g.add_argument("--cache-samples", type=int, default=_DEFAULTS.cache_samples)
    g.add_argument("--val-size", type=int, default=_DEFAULTS.val_size)
    g.add_argument("--val-every", type=int, default=_DEFAULTS.val_every)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", choices=("float32", "float64"), default=None)
    g.add_argument("--checkpoint", default=None, help="checkpoint file; rerunning the same command resumes from it")
    g.add_argument("--checkpoint-every", type=int, default=_DEFAULTS.checkpoint_every)
    g.add_argument("--model-tag", default=None)
    g.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE",
                   help="keyword argument for every model call (VALUE parsed as JSON, else kept as text); repeatable")
    g.add_argument("--no-progress", action="store_true")
    add_condition_arguments(parser, sampling=False)
    return parser


def run_train(args: argparse.Namespace) -> int:
    """Run the ``train`` subcommand; returns the exit status."""
    from ..training import plot_history, train
    from ..training.distributed import launched_by_torchrun

    dtype = DTYPES[args.dtype]
    model, shape, name, card = resolve_model(args.model, device=args.device, dtype=dtype)
    if args.shape is not None:
        shape = parse_shape(args.shape)
    if shape is None:
        raise ValueError(f"model {args.model!r} does not say its per-sample shape: pass --shape (e.g. --shape 2)")
    cond = conditioning(model, card, args)
    pool = training_pool(cond)
    solver = _initial_solver(args)
    ns = args.solver == "nonstationary"
    kind = "ns" if ns else f"rk{solver.order}"
    output = Path(args.output or f"bespoke-{name}-{kind}-nfe{solver.nfe}.safetensors")
    plot = Path(args.plot) if args.plot else output.with_suffix(".png")
    if not plot.suffix:
        plot = plot.with_suffix(".png")        # as matplotlib would write it
    if plot.resolve() == output.resolve():     # -o NAME.png: the plot would replace the solver
        plot = output.with_name(output.name + ".png")
    rank = int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0
    if rank == 0:   # before training, which would otherwise be lost to a bad path at the end
        writable_file(output, "-o")
        writable_file(plot, "--plot")
    loss = args.loss or ("log_mse" if ns else _DEFAULTS.loss)
    if rank == 0 and cond.describe():
        rows = next(iter(pool.values())).shape[0]
        print(f"{cond.describe()}; each training sample draws one of {rows} condition rows")
    solver = train(cond.model, solver, shape=shape, iterations=args.iterations, batch_size=args.batch_size, seed=args.seed,
                   lr=args.lr, L_tau=args.L_tau, loss=loss, lr_schedule=args.lr_schedule, grad_clip=args.grad_clip,
                   gt=args.gt, gt_rtol=args.gt_tol, gt_atol=args.gt_tol, cache_dir=args.cache_dir,
                   cache_samples=args.cache_samples, val_size=args.val_size, val_every=args.val_every,
                   device=args.device, dtype=dtype, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                   model_tag=args.model_tag, model_extras=parse_extras(args.extra), progress=not args.no_progress,
                   **({"conditions": pool} if pool is not None else {}))
    if rank != 0:
        return 0
    h = solver.history
    weights = ((card or {}).get("weights") or {}).get("sha256")   # an embedded-style model's weights, as the demo records
    solver.save(output, metadata={"model": args.model, **({"model_weights_sha256": weights} if weights else {}),
                                  **({"guidance": cond.guidance} if cond.guidance is not None else {}),
                                  **({"conditions": args.conditions} if args.conditions is not None else {})})
    base = f"--init {args.init}" if args.init is not None else \
        solver.metadata.get("initialised_from") or getattr(solver, "base", None) or ("midpoint" if solver.order == 2 else "Euler")
    if not h.val_rmse:  # --iterations 0 without a fit: nothing was solved or measured
        print(f"not validated (--iterations {args.iterations}: the solver is written as it started)")
    else:
        print(f"validation RMSE vs ground truth at NFE {solver.nfe}: {base} {h.base_rmse:.5g}, "
              f"bespoke {h.best_rmse:.5g} ({h.best_rmse / h.base_rmse:.3f}x; iteration {h.best_iteration})"
              if h.base_rmse else f"validation RMSE: bespoke {h.best_rmse:.5g}")
    print(f"wrote {output}")
    try:
        what = "non-stationary" if ns else f"bespoke order {solver.order}, {solver.steps} steps"
        plot_history(h, plot, title=f"{name}: {what} (NFE {solver.nfe})")
        print(f"wrote {plot}")
    except ImportError:
        print("matplotlib is not installed: no learning-curve PNG (pip install matplotlib)")
    return 0


def _initial_solver(args: argparse.Namespace):
    """The solver training starts from: fresh (identity: Euler / midpoint), or --init's file (converted to
    the non-stationary family for --solver nonstationary: it then samples as the file's solver does)."""
    from ..solvers import BespokeSolver, NonStationarySolver, load_solver

    ns = args.solver == "nonstationary"
    _refuse_other_family(args)
    if args.init is None:
        return NonStationarySolver(_nfe(args), args.base or "euler") if ns else BespokeSolver(_steps(args), order=_order(args))
    start = load_solver(args.init)
    if ns:
        solver = start if isinstance(start, NonStationarySolver) else NonStationarySolver.from_solver(start)
        _check_init(args, solver, nfe=args.nfe, steps=args.steps)
        return solver
    if not isinstance(start, BespokeSolver):
        raise ValueError(f"--init {args.init} holds a {type(start).__name__}; a BespokeSolver cannot start from it "
                         f"(pass --solver nonstationary)")
    _check_init(args, start, nfe=args.nfe, steps=args.steps, order=args.order)
    return start


def _check_init(args: argparse.Namespace, solver, **given) -> None:
    """The solver of --init decides its size: a flag that says otherwise is refused (it was ignored, and the
    output file then held another NFE than its name said)."""
    if args.base is not None:
        raise ValueError(f"--base sets a fresh solver's base; --init {args.init} starts from that file's solver "
                         f"({solver!r}): drop --base or --init")
    for flag, value in given.items():
        if value is not None and value != getattr(solver, flag):
            raise ValueError(f"--{flag} {value}, but --init {args.init} holds a solver with {flag} "
                             f"{getattr(solver, flag)} ({solver!r}): drop --{flag}, or start fresh without --init")


def _order(args: argparse.Namespace) -> int:
    return 2 if args.order is None else args.order


def _nfe(args: argparse.Namespace) -> int:
    """--nfe of a non-stationary solver (one evaluation per step: --steps would say the same, so it is refused)."""
    return 10 if args.nfe is None else args.nfe


def _refuse_other_family(args: argparse.Namespace) -> None:
    """--steps and --order belong to BespokeSolver, --base to NonStationarySolver: given to the other, they
    were ignored."""
    if args.solver == "nonstationary":
        for flag in ("steps", "order"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} is for --solver bespoke; a non-stationary solver takes --nfe and --base "
                                 f"(got --{flag} {getattr(args, flag)})")
    elif args.base is not None:
        raise ValueError(f"--base is for --solver nonstationary; a BespokeSolver's base is its --order (1: Euler, "
                         f"2: midpoint) (got --base {args.base})")


def _steps(args: argparse.Namespace) -> int:
    """--steps of a BespokeSolver, or --nfe / --order (NFE = steps x order); both must agree when both are given."""
    order = _order(args)
    if args.nfe is None:
        return 5 if args.steps is None else args.steps
    if args.nfe % order or args.nfe < order:
        raise ValueError(f"--nfe {args.nfe}: a BespokeSolver of order {order} makes {order} evaluations per "
                         f"step, so --nfe must be a positive multiple of {order}")
    if args.steps is not None and args.steps * order != args.nfe:
        raise ValueError(f"--steps {args.steps} with --order {order} makes NFE {args.steps * order}, "
                         f"not --nfe {args.nfe}; pass one of them")
    return args.nfe // order
