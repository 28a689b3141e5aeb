"""``bespoke-ext sample``: draw samples with a solver file or a baseline method.

    bespoke-ext sample moons2d --solver bespoke-moons2d-rk2-nfe10.safetensors -n 1000
    bespoke-ext sample mnist --method dpm++2m --nfe 10 -o digits.safetensors
    bespoke-ext sample mnist_cond --solver bespoke-mnist_cond-rk2-nfe10.safetensors --labels 3,7 -n 8

The model is given as for ``bespoke-ext train`` (an embedded model's name, a checkpoint file with its
JSON card, or ``module:attribute``); a conditional one takes --guidance, --labels or --conditions
(cli/conditioning.py). Samples are written as safetensors (tensor ``samples``, with the
method, NFE, seed and model in the metadata): data only, like every file of the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..groundtruth.atomic import atomic_save_tensors
from ..sampling import METHODS
from .conditioning import add_condition_arguments, conditioning
from .model_spec import DTYPES, parse_shape, resolve_model
from .paths import writable_dir, writable_file

__all__ = ["add_sample_arguments", "run_sample"]


def add_sample_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``sample`` subcommand's arguments to ``parser``."""
    parser.add_argument("model", help="an embedded model name, a model checkpoint (.safetensors with its "
                                      ".json card) or module:attribute")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--solver", default=None, help="a solver file written by `bespoke-ext train`")
    how.add_argument("--method", default=None, choices=METHODS, help="a baseline method (default midpoint)")
    parser.add_argument("--nfe", type=int, default=None,
                        help="model evaluations for a fixed-step --method (default 10; not for --solver, the "
                             "adaptive or the multistep methods)")
    parser.add_argument("--tol", type=float, default=None,
                        help="adaptive methods (dopri5, dopri8, bosh3, ...): rtol = atol (default 1e-5)")
    parser.add_argument("--step-size", type=float, default=None,
                        help="multistep methods (explicit_adams, implicit_adams, fixed_adams): the step (default 0.1)")
    parser.add_argument("-n", "--num", type=int, default=None,
                        help="number of samples (default 16, or the rows of --conditions)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise x0")
    parser.add_argument("--shape", default=None, help="per-sample shape, e.g. 2 or 1,28,28 (default: the model's)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("float32", "float64"), default=None)
    parser.add_argument("-o", "--output", default=None, help="samples file (default samples-<model>-<method>-nfe<N>.safetensors)")
    add_condition_arguments(parser, sampling=True)
    return parser


def _warn_if_trained_for_another(solver, model, card: Optional[dict] = None) -> None:
    """A warning when the solver file records a training model whose identity differs from ``model``'s: by the
    weights' sha256 where both the file and the model's card have it (the demo, the bench and ``bespoke-ext
    train`` record it; stable across package versions), else by the model tag."""
    from ..models.identity import model_tag

    recorded, weights = solver.metadata.get("model_weights_sha256"), ((card or {}).get("weights") or {}).get("sha256")
    if recorded and weights:
        if recorded != weights:
            print(f"warning: this solver was trained for the weights {recorded[:16]}..., not for this model's "
                  f"({weights[:16]}...): its schedule is tuned to that model's field, and may sample this one poorly",
                  file=sys.stderr)
        return
    trained = (solver.metadata.get("training") or {}).get("model_tag")
    if not trained:
        return
    try:
        tag = model_tag(model, strict=False)
    except Exception:  # noqa: BLE001 -- identity is advisory here; sampling still works
        return
    if ":" in tag and tag != trained:
        print(f"warning: this solver was trained for the model {trained}, not for this one ({tag}): its "
              f"schedule is tuned to that model's field, and may sample this one poorly", file=sys.stderr)


def _trained_guidance(solver) -> Optional[float]:
    """The guidance scale a solver file records (``bespoke-ext train`` and the demo write it), else None."""
    try:
        return float(solver.metadata["guidance"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _method_options(args: argparse.Namespace, method: str) -> dict:
    """sample()'s step options for a baseline method: --nfe for fixed-step methods, --tol for adaptive ones,
    --step-size for multistep ones; an option another kind takes is refused with the kind's own."""
    from ..sampling.adaptive import ADAPTIVE_METHODS, MULTISTEP_METHODS

    given = {"--nfe": args.nfe, "--tol": args.tol, "--step-size": args.step_size}
    own = "--tol" if method in ADAPTIVE_METHODS else "--step-size" if method in MULTISTEP_METHODS else "--nfe"
    kind = {"--tol": "adaptive", "--step-size": "a multistep method", "--nfe": "a fixed-step method"}[own]
    for flag, value in given.items():
        if value is not None and flag != own:
            raise ValueError(f"{flag} does not apply to --method {method} ({kind}: it takes {own})")
    if own == "--tol":
        tol = 1e-5 if args.tol is None else args.tol
        return {"atol": tol, "rtol": tol}
    if own == "--step-size":
        return {"step_size": 0.1 if args.step_size is None else args.step_size}
    return {"nfe": 10 if args.nfe is None else args.nfe}


def run_sample(args: argparse.Namespace) -> int:
    """Run the ``sample`` subcommand; returns the exit status."""
    from ..sampling import sample
    from ..solvers import load_solver

    if args.num is not None and args.num < 1:
        raise ValueError(f"--num must be at least 1, got {args.num}")
    dtype = DTYPES[args.dtype]
    model, shape, name, card = resolve_model(args.model, device=args.device, dtype=dtype)
    if args.shape is not None:
        shape = parse_shape(args.shape)
    if not shape:
        raise ValueError(f"model {args.model!r} does not say its per-sample shape: pass --shape (e.g. --shape 2)")
    device = torch.device(args.device or "cpu")
    output = Path(args.output) if args.output else None
    # checked before sampling, so the samples are not lost at the end (the default name, in the current
    # folder, needs the run's method and NFE)
    if output is not None:
        writable_file(output, "-o")
    else:
        writable_dir(Path.cwd(), "the current folder")

    kwargs: dict = {}
    solver = None
    if args.solver:
        if args.nfe is not None or args.tol is not None or args.step_size is not None:
            raise ValueError("--nfe, --tol and --step-size apply to --method; a solver file fixes its own steps")
        solver = load_solver(args.solver).to(device)
        kwargs["solver"] = solver
        label = f"{solver.method} from {args.solver}"
        if solver.metadata.get("model"):
            print(f"solver trained for model {solver.metadata['model']!r}")
    else:
        method = args.method or "midpoint"
        kwargs["method"] = method
        kwargs.update(_method_options(args, method))
        label = method
    trained_g = _trained_guidance(solver)
    cond = conditioning(model, card, args, default_guidance=trained_g)
    extras = {k: v.to(device) for k, v in cond.sample_inputs(args.labels, args.num).items()}
    taken = sorted(set(extras) & set(inspect.signature(sample).parameters))
    if taken:
        raise ValueError(f"--conditions: {taken} are bespoke_ext.sample()'s own arguments, so they cannot reach the "
                         f"model under those names; rename them in the file and in the model's signature")
    num = next(iter(extras.values())).shape[0] if extras else (16 if args.num is None else args.num)
    if cond.describe():
        print(cond.describe())
    if trained_g is not None and cond.guidance is not None and trained_g != cond.guidance:
        print(f"warning: this solver was trained at guidance g = {trained_g:g}, not {cond.guidance:g}: its "
              f"schedule is tuned to that field", file=sys.stderr)
    elif solver is not None:
        _warn_if_trained_for_another(solver, cond.model, card)
    x0 = torch.randn((num, *shape), generator=torch.Generator().manual_seed(args.seed),
                     dtype=dtype or torch.float32).to(device)

    start = time.perf_counter()
    samples, stats = sample(cond.model, x0, return_stats=True, **kwargs, **extras)
    if samples.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    bad = int((~torch.isfinite(samples.reshape(samples.shape[0], -1))).any(1).sum())
    if bad:
        raise ValueError(f"{bad} of {num} samples hold NaN or inf ({label}): nothing written; check the model "
                         f"and the solver file (a solver trained for another model?)")
    output = output or Path(f"samples-{name}-{stats.method}-nfe{stats.nfe}.safetensors")
    meta = {"method": stats.method, "nfe": str(stats.nfe), "seed": str(args.seed), "model": str(args.model),
            "solver": str(args.solver or ""), "stats": json.dumps(dataclasses.asdict(stats)),
            **({"guidance": str(cond.guidance)} if cond.guidance is not None else {})}
    tensors = {"samples": samples.detach().cpu().contiguous()}
    if cond.key is not None:   # which label each sample shows
        tensors["labels"] = extras[cond.key].cpu().contiguous()
    try:
        atomic_save_tensors(output, tensors, metadata=meta)
    except Exception as exc:   # safetensors' own error type: the path, not a traceback
        raise ValueError(f"-o {output}: the samples could not be written ({exc})") from None
    print(f"{num} samples of shape {tuple(shape)} with {label}: NFE {stats.nfe}, "
          f"network forwards {stats.network_forwards}, {seconds:.3f} s -> {output}")
    return 0
